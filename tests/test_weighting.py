"""Loss weightings against explicit eps / v errors computed in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import weighting

B, C, H, W = 7, 2, 3, 5
LAM = np.array([-20.0, -5.0, -0.5, 0.0, 0.5, 3.0, 12.0])  # both sides of SNR = 1


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(B, C, H, W))
    eps = rng.normal(size=(B, C, H, W))
    x_hat = x + rng.normal(size=(B, C, H, W)) * rng.uniform(0.01, 1.0, size=(B, 1, 1, 1))
    alpha = np.sqrt(1 / (1 + np.exp(-LAM)))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(LAM)))[:, None, None, None]
    z = alpha * x + sigma * eps
    eps_hat = (z - alpha * x_hat) / sigma  # eps derived from x_hat
    return x, eps, x_hat, eps_hat, alpha, sigma, z


def _per_example_mse(a, b):
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)


def _loss(kind, x_hat, x):
    return weighting.per_example_loss(x_hat=torch.tensor(x_hat), x=torch.tensor(x),
                                      logsnr=torch.tensor(LAM), kind=kind).numpy()


def test_constant_is_x_error():
    x, eps, x_hat, *_ = _problem()
    out = _loss("constant", x_hat, x)
    assert out.shape == (B,)
    np.testing.assert_allclose(out, _per_example_mse(x_hat, x), rtol=1e-12)


def test_snr_is_explicit_eps_error():
    x, eps, x_hat, eps_hat, *_ = _problem(1)
    eps_err = _per_example_mse(eps_hat, eps)
    x_err = _per_example_mse(x_hat, x)
    np.testing.assert_allclose(eps_err, np.exp(LAM) * x_err, rtol=1e-6)  # the identity itself
    np.testing.assert_allclose(_loss("snr", x_hat, x), eps_err, rtol=1e-6)


def test_snr_trunc_is_max_of_x_and_eps_error():
    x, eps, x_hat, eps_hat, *_ = _problem(2)
    x_err = _per_example_mse(x_hat, x)
    eps_err = _per_example_mse(eps_hat, eps)
    out = _loss("snr_trunc", x_hat, x)
    np.testing.assert_allclose(out, np.maximum(x_err, eps_err), rtol=1e-6)
    np.testing.assert_allclose(out, np.maximum(np.exp(LAM), 1.0) * x_err, rtol=1e-12)
    # low-SNR examples use the x error, high-SNR the eps error
    np.testing.assert_allclose(out[LAM < 0], x_err[LAM < 0], rtol=1e-12)


def test_snr_plus_one_is_explicit_v_error():
    x, eps, x_hat, eps_hat, alpha, sigma, _ = _problem(3)
    v = alpha * eps - sigma * x
    v_hat = alpha * eps_hat - sigma * x_hat
    v_err = _per_example_mse(v_hat, v)
    out = _loss("snr_plus_one", x_hat, x)
    np.testing.assert_allclose(out, v_err, rtol=1e-6)
    np.testing.assert_allclose(out, (1.0 + np.exp(LAM)) * _per_example_mse(x_hat, x), rtol=1e-12)


@pytest.mark.parametrize("kind", weighting.KINDS)
def test_per_example_shape_and_mean_over_pixels(kind):
    x, eps, x_hat, *_ = _problem(4)
    out = _loss(kind, x_hat, x)
    assert out.shape == (B,)
    # per example: mean (not sum) over pixels -> duplicating pixels leaves the loss unchanged
    out2 = weighting.per_example_loss(x_hat=torch.tensor(np.concatenate([x_hat, x_hat], 1)),
                                      x=torch.tensor(np.concatenate([x, x], 1)), logsnr=torch.tensor(LAM), kind=kind)
    np.testing.assert_allclose(out2.numpy(), out, rtol=1e-12)
    # examples are independent: perturbing example 0 changes only loss[0]
    x_hat_p = x_hat.copy()
    x_hat_p[0] += 0.3
    out3 = _loss(kind, x_hat_p, x)
    np.testing.assert_array_equal(out3[1:], out[1:])
    assert out3[0] != out[0]


def test_float32_inputs():
    x, eps, x_hat, *_ = _problem(5)
    out = weighting.per_example_loss(x_hat=torch.tensor(x_hat, dtype=torch.float32),
                                     x=torch.tensor(x, dtype=torch.float32),
                                     logsnr=torch.tensor(LAM, dtype=torch.float32), kind="snr_trunc")
    assert out.shape == (B,) and torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), np.maximum(np.exp(LAM), 1) * _per_example_mse(x_hat, x), rtol=1e-4)


def test_zero_error_is_zero_loss():
    x, *_ = _problem(6)
    for kind in weighting.KINDS:
        assert (_loss(kind, x, x) == 0).all()


def test_check_combination_refuses_eps_snr_trunc():
    with pytest.raises(ValueError, match=r"(?s)eps.*snr_trunc|snr_trunc.*eps") as info:
        weighting.check_combination(parameterization="eps", weighting="snr_trunc")
    assert "diverge" in str(info.value)


@pytest.mark.parametrize("param,kind", [(p, k) for p in ("eps", "x", "v", "both")
                                        for k in ("constant", "snr", "snr_trunc", "snr_plus_one")
                                        if (p, k) != ("eps", "snr_trunc")])
def test_check_combination_accepts_the_rest(param, kind):
    weighting.check_combination(parameterization=param, weighting=kind)


def test_check_combination_unknown_names():
    with pytest.raises(ValueError, match="parameterization"):
        weighting.check_combination(parameterization="epsilon", weighting="snr")
    with pytest.raises(ValueError, match="weighting"):
        weighting.check_combination(parameterization="x", weighting="truncated")


def test_bad_arguments():
    x = torch.zeros(B, C, H, W)
    with pytest.raises(ValueError, match="kind"):
        weighting.per_example_loss(x_hat=x, x=x, logsnr=torch.zeros(B), kind="min_snr")
    with pytest.raises(ValueError, match="x_hat"):
        weighting.per_example_loss(x_hat=x[:, :1], x=x, logsnr=torch.zeros(B), kind="snr")
    with pytest.raises(ValueError, match="logsnr"):
        weighting.per_example_loss(x_hat=x, x=x, logsnr=torch.zeros(B, 1), kind="snr")
