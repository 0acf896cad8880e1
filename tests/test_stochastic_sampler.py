"""The stochastic sampler of Meng et al. (a 2/N DDIM step, then a forward-process step back) against float64
recursions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import samplers
from tests.reference import np_alpha_sigma, np_logsnr
from tests.sampler_oracles import (
    Recorder,
    _col,
    _z,
    point_oracle,
)


def affine_gaussian_oracle(mu: float, s2: float):
    """Data N(mu, s^2 I): E[x | z] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha mu) exactly."""
    def fn(z, lam):
        a2, sg2 = _col(torch.sigmoid(lam)), _col(torch.sigmoid(-lam))
        x_hat = mu + a2.sqrt() * s2 / (a2 * s2 + sg2) * (z - a2.sqrt() * mu)
        return x_hat, (z - a2.sqrt() * x_hat) / sg2.sqrt()
    return fn


def np_stochastic_moments(mu: float, s2: float, n: int) -> tuple[float, float]:
    """Mean and variance of the sampler's output, per pixel, by an independent scalar recursion (float64).

    x_hat = k z + b is affine; the DDIM step to u is affine in z; the forward step adds independent noise.
    """
    m, v = 0.0, 1.0  # z ~ N(0, 1) at t = 1
    for i in range(n - 1, -1, -1):
        a_t, s_t = np_alpha_sigma(np_logsnr((i + 1) / n))
        k = a_t * s2 / (a_t**2 * s2 + s_t**2)
        b = mu - k * a_t * mu
        if i == 0:
            return k * m + b, k**2 * v
        a_u, s_u = np_alpha_sigma(np_logsnr((i - 1) / n))
        a_s, s_s = np_alpha_sigma(np_logsnr(i / n))
        c1, c2 = s_u / s_t, a_u - s_u * a_t / s_t  # z_u = c1 z + c2 x_hat
        m, v = (c1 + c2 * k) * m + c2 * b, (c1 + c2 * k) ** 2 * v
        r = a_s / a_u
        m, v = r * m, r**2 * v + (s_s**2 - r**2 * s_u**2)
    raise AssertionError


@pytest.mark.parametrize("n", [2, 4, 8])
def test_stochastic_two_step_moments_match_a_float64_recursion(n):
    mu, s2 = 0.3, 0.2
    z = torch.randn(40000, 1, 2, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    out = samplers.stochastic_two_step(affine_gaussian_oracle(mu, s2), z, num_steps=n, clip=False,
                                       generator=torch.Generator().manual_seed(100 + n)).numpy().ravel()
    mean, var = np_stochastic_moments(mu, s2, n)
    count = out.size
    assert abs(out.mean() - mean) < 5 * np.sqrt(var / count), (out.mean(), mean)
    assert abs(out.var() - var) < 5 * var * np.sqrt(2 / count), (out.var(), var)
    if n > 2:  # and not DDIM's moments: the noise really is injected (at N = 2 both variances lie within 1 %)
        det = samplers.ddim(affine_gaussian_oracle(mu, s2), z, num_steps=n, clip=False).numpy().ravel()
        assert abs(det.var() - var) > 10 * var * np.sqrt(2 / count)


def test_stochastic_two_step_with_given_noise_matches_a_float64_reference():
    """The exact path: the same noise draws replayed, every step written out in numpy (with clipping)."""
    def den(z, lam):
        x_hat = 1.8 * torch.tanh(0.9 * z + torch.sin(_col(lam) / 4))  # leaves [-1, 1]: clipping shows
        return x_hat, torch.cos(z) + 0.2 * z  # inconsistent eps: the sampler must recompute it after clipping

    n, z = 6, _z(seed=8)
    out = samplers.stochastic_two_step(den, z, num_steps=n, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    zz = z.numpy()
    for i in range(n - 1, -1, -1):
        lam_t = np_logsnr((i + 1) / n)
        a_t, s_t = np_alpha_sigma(lam_t)
        x = np.clip(1.8 * np.tanh(0.9 * zz + np.sin(lam_t / 4)), -1, 1)
        if i == 0:
            zz = x
            break
        e = (zz - a_t * x) / s_t
        a_u, s_u = np_alpha_sigma(np_logsnr((i - 1) / n))
        a_s, s_s = np_alpha_sigma(np_logsnr(i / n))
        z_u = a_u * x + s_u * e
        noise = torch.randn(z.shape, dtype=torch.float64, generator=g).numpy()
        zz = (a_s / a_u) * z_u + np.sqrt(s_s**2 - (a_s / a_u) ** 2 * s_u**2) * noise
    np.testing.assert_allclose(out.numpy(), zz, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_stochastic_two_step_makes_n_calls_on_the_student_grid(n):
    rec = Recorder(point_oracle(torch.zeros(1, 2, 3, 3, dtype=torch.float64)))
    out = samplers.stochastic_two_step(rec, _z(), num_steps=n, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == n
    got = np.array([lam[0].item() for _, lam in rec.calls])
    np.testing.assert_allclose(got, np_logsnr([(i + 1) / n for i in range(n - 1, -1, -1)]), atol=1e-9)
    assert float(out.abs().max()) == 0.0  # a point data set comes back exactly, noise or not
    if n == 1:
        torch.testing.assert_close(out, samplers.ddim(rec, _z(), num_steps=1))


def test_forward_step_has_the_forward_process_mean_and_variance():
    lam_u = torch.tensor([20.0, 3.0, 0.0, -5.0], dtype=torch.float64)
    lam_s = torch.tensor([19.0, 1.0, -0.5, -20.0], dtype=torch.float64)
    a_u, s_u = np_alpha_sigma(lam_u.numpy())
    a_s, s_s = np_alpha_sigma(lam_s.numpy())
    ones = torch.ones(4, 1, 1, 1, dtype=torch.float64)
    scale = samplers.forward_step(z_u=ones, logsnr_u=lam_u, logsnr_s=lam_s, noise=torch.zeros_like(ones))
    std = samplers.forward_step(z_u=torch.zeros_like(ones), logsnr_u=lam_u, logsnr_s=lam_s, noise=ones)
    np.testing.assert_allclose(scale.numpy().ravel(), a_s / a_u, rtol=1e-13)
    np.testing.assert_allclose(std.numpy().ravel() ** 2, s_s**2 - (a_s / a_u) ** 2 * s_u**2, rtol=1e-9)
    # from the clean end (lambda = +inf, as a discrete schedule has at t = 0) the variance is sigma_s^2
    inf = torch.full((1,), float("inf"), dtype=torch.float64)
    out = samplers.forward_step(z_u=torch.ones(1, 1, 1, 1, dtype=torch.float64), logsnr_u=inf,
                                logsnr_s=torch.zeros(1, dtype=torch.float64), noise=torch.ones(1, 1, 1, 1))
    assert out.item() == pytest.approx(np.sqrt(0.5) + np.sqrt(0.5), abs=1e-12)
