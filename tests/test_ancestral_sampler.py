"""The ancestral (stochastic) sampler with oracle denoisers whose outputs are known in closed form (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import samplers
from tests.reference import np_alpha_sigma
from tests.sampler_oracles import (
    Recorder,
    _z,
    gaussian_oracle,
    point_oracle,
)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_ancestral_deterministic_under_seed(gamma):
    den = gaussian_oracle(0.3)
    z = _z(seed=6)
    a = samplers.ancestral(den, z, num_steps=8, gamma=gamma, generator=torch.Generator().manual_seed(11))
    b = samplers.ancestral(den, z, num_steps=8, gamma=gamma, generator=torch.Generator().manual_seed(11))
    c = samplers.ancestral(den, z, num_steps=8, gamma=gamma, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.allclose(c, a)
    assert torch.isfinite(a).all()


def test_ancestral_does_not_touch_global_rng_when_given_a_generator():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    samplers.ancestral(gaussian_oracle(0.3), _z(), num_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("n", [1, 2, 8])
def test_ancestral_calls_and_point_oracle(n):
    x0 = torch.tensor(np.random.default_rng(2).uniform(-1, 1, size=(1, 2, 3, 3)))
    rec = Recorder(point_oracle(x0))
    out = samplers.ancestral(rec, _z(), num_steps=n, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == n
    np.testing.assert_allclose(out.numpy(), x0.expand(4, -1, -1, -1).numpy(), atol=1e-12)


def np_posterior(z_t, x, lam_t, lam_s):
    """q(z_s | z_t, x) for s < t.

    From alpha_{t|s} = alpha_t/alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:
    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x,
    var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2."""
    a_t, s_t = np_alpha_sigma(lam_t)
    a_s, s_s = np_alpha_sigma(lam_s)
    a_ts = a_t / a_s
    s2_ts = s_t**2 - a_ts**2 * s_s**2
    mean = (a_ts * s_s**2 / s_t**2)[:, None, None, None] * z_t + (a_s * s2_ts / s_t**2)[:, None, None, None] * x
    return mean, s2_ts * s_s**2 / s_t**2, s2_ts


def test_ancestral_moments_gamma0_is_the_gaussian_posterior():
    rng = np.random.default_rng(0)
    lam_t = np.array([-20.0, -5.0, 0.0, 3.0, 10.0])
    lam_s = lam_t + np.array([0.5, 2.0, 1.0, 4.0, 0.01])
    z_t, x = rng.normal(size=(5, 2, 2, 2)), rng.uniform(-1, 1, size=(5, 2, 2, 2))
    mean, logvar = samplers.ancestral_moments(z_t=torch.tensor(z_t), x_hat=torch.tensor(x),
                                              logsnr_t=torch.tensor(lam_t), logsnr_s=torch.tensor(lam_s), gamma=0.0)
    mean_np, var_np, var_ts = np_posterior(z_t, x, lam_t, lam_s)
    np.testing.assert_allclose(mean.numpy(), mean_np, rtol=1e-9, atol=1e-12)
    var = torch.exp(logvar).numpy().reshape(5, -1)[:, 0]
    np.testing.assert_allclose(var, var_np, rtol=1e-9)
    # and the design's form (1 - r) sigma_s^2, r = e^{lambda_t - lambda_s}
    r = np.exp(lam_t - lam_s)
    np.testing.assert_allclose(var, (1 - r) * np_alpha_sigma(lam_s)[1] ** 2, rtol=1e-9)
    # gamma = 1: sigma_{t|s}^2 = (1 - r) sigma_t^2; gamma in between: log-interpolation
    _, lv1 = samplers.ancestral_moments(z_t=torch.tensor(z_t), x_hat=torch.tensor(x), logsnr_t=torch.tensor(lam_t),
                                        logsnr_s=torch.tensor(lam_s), gamma=1.0)
    np.testing.assert_allclose(torch.exp(lv1).numpy().reshape(5, -1)[:, 0], var_ts, rtol=1e-9)
    m3, lv3 = samplers.ancestral_moments(z_t=torch.tensor(z_t), x_hat=torch.tensor(x), logsnr_t=torch.tensor(lam_t),
                                         logsnr_s=torch.tensor(lam_s), gamma=0.3)
    np.testing.assert_allclose(lv3.numpy().reshape(5, -1)[:, 0], 0.3 * np.log(var_ts) + 0.7 * np.log(var_np), rtol=1e-9)
    np.testing.assert_allclose(m3.numpy(), mean_np, rtol=1e-9, atol=1e-12)  # gamma changes only the variance


def test_ancestral_gaussian_oracle_many_steps_has_the_data_variance():
    s2 = 0.25
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = samplers.ancestral(gaussian_oracle(s2), z, num_steps=256, gamma=0.0, clip=False,
                             generator=torch.Generator().manual_seed(2))
    assert out.var().item() == pytest.approx(s2, rel=0.05)


def test_ancestral_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        samplers.ancestral(gaussian_oracle(0.3), _z(), num_steps=2, gamma=1.5)
