"""Parameterizations: the exact true network output must give back the exact x and eps (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import parameterization

B, C, H, W = 6, 3, 4, 4


def _problem(seed: int = 0, *, scale: float = 1.0):
    """x, eps, logsnr (B,) spread over [-20, 20] (ends included), z = alpha x + sigma eps; numpy float64."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(size=(B, C, H, W)) * 0.6, -1, 1) * scale
    eps = rng.normal(size=(B, C, H, W))
    lam = np.array([-20.0, -7.3, -1.0, 0.0, 4.2, 20.0])
    alpha = np.sqrt(1.0 / (1.0 + np.exp(-lam)))[:, None, None, None]
    sigma = np.sqrt(1.0 / (1.0 + np.exp(lam)))[:, None, None, None]
    z = alpha * x + sigma * eps
    return x, eps, lam, alpha, sigma, z


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def _true_output(kind: str, *, x, eps, alpha, sigma):
    if kind == "eps":
        return eps
    if kind == "x":
        return x
    if kind == "v":
        return alpha * eps - sigma * x
    return np.concatenate([x, eps], axis=1)  # both: first C channels x, last C eps


@pytest.mark.parametrize("kind", ["eps", "x", "v", "both"])
def test_true_output_recovers_x_and_eps(kind):
    x, eps, lam, alpha, sigma, z = _problem()
    out = _true_output(kind, x=x, eps=eps, alpha=alpha, sigma=sigma)
    x_hat, eps_hat = parameterization.to_x_eps(_t(out), z=_t(z), logsnr=_t(lam), kind=kind)
    assert x_hat.dtype == torch.float64 and eps_hat.dtype == torch.float64
    assert x_hat.shape == (B, C, H, W) and eps_hat.shape == (B, C, H, W)
    # Recovering x from eps divides by alpha (4.5e-5 at lambda=-20) and recovering eps from x divides by
    # sigma (4.5e-5 at lambda=20): compare each only where that division is well conditioned, and
    # everywhere with a tolerance scaled by the conditioning.
    x_tol = 1e-10 * np.maximum(1.0, 1.0 / alpha)
    eps_tol = 1e-10 * np.maximum(1.0, 1.0 / sigma)
    assert (np.abs(x_hat.numpy() - x) <= x_tol).all(), np.abs(x_hat.numpy() - x).max()
    assert (np.abs(eps_hat.numpy() - eps) <= eps_tol).all(), np.abs(eps_hat.numpy() - eps).max()
    mid = slice(1, 5)  # lambda in [-7.3, 4.2]: all four must be exact to 1e-10
    np.testing.assert_allclose(x_hat.numpy()[mid], x[mid], rtol=0, atol=1e-10)
    np.testing.assert_allclose(eps_hat.numpy()[mid], eps[mid], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["eps", "x", "v", "both"])
def test_consistency_z_equals_alpha_x_plus_sigma_eps(kind):
    """For ANY output (not only the true one), (x_hat, eps_hat) must reconstruct z."""
    x, eps, lam, alpha, sigma, z = _problem(1)
    rng = np.random.default_rng(7)
    c_out = 2 * C if kind == "both" else C
    out = rng.normal(size=(B, c_out, H, W))
    x_hat, eps_hat = parameterization.to_x_eps(_t(out), z=_t(z), logsnr=_t(lam), kind=kind)
    np.testing.assert_allclose(alpha * x_hat.numpy() + sigma * eps_hat.numpy(), z, atol=1e-10)


def test_each_formula_on_arbitrary_outputs():
    """The design's formulas applied to arbitrary outputs, computed in numpy."""
    x, eps, lam, alpha, sigma, z = _problem(2)
    rng = np.random.default_rng(3)
    o = rng.normal(size=(B, C, H, W))
    o2 = rng.normal(size=(B, 2 * C, H, W))
    mid = slice(1, 5)
    expected = {
        "eps": (z - sigma * o) / alpha,
        "x": o,
        "v": alpha * z - sigma * o,
        "both": sigma**2 * o2[:, :C] + alpha * (z - sigma * o2[:, C:]),
    }
    for kind, x_exp in expected.items():
        out = o2 if kind == "both" else o
        x_hat, eps_hat = parameterization.to_x_eps(_t(out), z=_t(z), logsnr=_t(lam), kind=kind)
        np.testing.assert_allclose(x_hat.numpy()[mid], x_exp[mid], atol=1e-10, err_msg=kind)
        eps_exp = o if kind == "eps" else (z - alpha * x_exp) / sigma
        np.testing.assert_allclose(eps_hat.numpy()[mid], eps_exp[mid], atol=1e-10, err_msg=kind)


@pytest.mark.parametrize("kind", ["eps", "x", "v", "both"])
def test_clipping_clips_x_first_then_recomputes_eps(kind):
    x, eps, lam, alpha, sigma, z = _problem(4, scale=3.0)  # x far outside [-1, 1]
    out = _true_output(kind, x=x, eps=eps, alpha=alpha, sigma=sigma)
    x_hat, eps_hat = parameterization.to_x_eps(_t(out), z=_t(z), logsnr=_t(lam), kind=kind, clip=True)
    x_clip = np.clip(x, -1.0, 1.0)
    assert np.abs(x).max() > 1.5  # the test really exercises clipping
    mid = slice(1, 5)
    np.testing.assert_allclose(x_hat.numpy()[mid], x_clip[mid], atol=1e-10)
    assert x_hat.abs().max().item() <= 1.0
    # eps recomputed from the CLIPPED x: eps_hat = (z - alpha clip(x)) / sigma, not the network's eps
    np.testing.assert_allclose(eps_hat.numpy(), (z - alpha * x_hat.numpy()) / sigma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(eps_hat.numpy()[mid], ((z - alpha * x_clip) / sigma)[mid], atol=1e-9)
    # where clipping changed x, eps_hat is no longer the true eps
    changed = np.abs(x) > 1.0
    assert not np.allclose(eps_hat.numpy()[mid][changed[mid]], eps[mid][changed[mid]])


@pytest.mark.parametrize("kind", ["eps", "x", "v", "both"])
def test_clip_off_does_not_clip(kind):
    x, eps, lam, alpha, sigma, z = _problem(5, scale=3.0)
    out = _true_output(kind, x=x, eps=eps, alpha=alpha, sigma=sigma)
    x_hat, _ = parameterization.to_x_eps(_t(out), z=_t(z), logsnr=_t(lam), kind=kind, clip=False)
    assert x_hat[1:5].abs().max().item() > 1.5


def test_eps_kind_without_clip_keeps_network_eps_bit_exact():
    x, eps, lam, alpha, sigma, z = _problem(6)
    out = _t(np.random.default_rng(0).normal(size=(B, C, H, W)))
    _, eps_hat = parameterization.to_x_eps(out, z=_t(z), logsnr=_t(lam), kind="eps")
    assert torch.equal(eps_hat, out)


def test_clip_x_eps_helper():
    x, eps, lam, alpha, sigma, z = _problem(8, scale=2.0)
    x_c, eps_c = parameterization.clip_x_eps(_t(x), z=_t(z), logsnr=_t(lam))
    np.testing.assert_array_equal(x_c.numpy(), np.clip(x, -1, 1))
    np.testing.assert_allclose(eps_c.numpy(), (z - alpha * np.clip(x, -1, 1)) / sigma, rtol=1e-12)


def test_output_channels():
    assert parameterization.output_channels(kind="both", channels=3) == 6
    for kind in ("eps", "x", "v"):
        assert parameterization.output_channels(kind=kind, channels=3) == 3
