"""DDIM with oracle denoisers whose outputs are known in closed form (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import samplers
from tests.reference import np_alpha_sigma, np_logsnr
from tests.sampler_oracles import (
    Recorder,
    _z,
    gaussian_oracle,
    np_gaussian_ddim_gain,
    np_gaussian_ode_gain,
    point_oracle,
)


@pytest.mark.parametrize("n", [1, 2, 8, 64])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_point_oracle_returns_the_point(n, clip):
    x0 = torch.tensor(np.random.default_rng(1).uniform(-1, 1, size=(1, 2, 3, 3)))
    out = samplers.ddim(point_oracle(x0), _z(), num_steps=n, clip=clip)
    assert out.shape == (4, 2, 3, 3) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), x0.expand(4, -1, -1, -1).numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_ddim_walks_the_student_grid(n):
    rec = Recorder(point_oracle(torch.zeros(1, 2, 3, 3, dtype=torch.float64)))
    samplers.ddim(rec, _z(), num_steps=n)
    assert len(rec.calls) == n
    expected = np_logsnr([(i + 1) / n for i in range(n - 1, -1, -1)])
    got = np.array([lam[0].item() for _, lam in rec.calls])
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert got[0] == pytest.approx(-20.0, abs=1e-9)  # starts at t = 1
    # the first call sees the input noise unchanged
    assert torch.equal(rec.calls[0][0], _z())


def test_ddim_one_step_calls_once_and_returns_clipped_x_hat():
    def den(z, lam):
        x_hat = 3.0 * z + 0.5
        return x_hat, torch.zeros_like(z)
    rec = Recorder(den)
    z = _z(seed=3)
    out = samplers.ddim(rec, z, num_steps=1)
    assert len(rec.calls) == 1
    np.testing.assert_allclose(out.numpy(), np.clip(3.0 * z.numpy() + 0.5, -1, 1), atol=0)
    assert (out.abs() == 1).any()  # clipping really happened
    out_nc = samplers.ddim(den, z, num_steps=1, clip=False)
    np.testing.assert_allclose(out_nc.numpy(), 3.0 * z.numpy() + 0.5, atol=0)


def test_ddim_clips_x_and_recomputes_eps_before_stepping():
    """With clipping, the step uses clip(x_hat) and eps = (z - alpha_t clip(x_hat)) / sigma_t, NOT the
    denoiser's eps_hat: check the z handed to the second call against that, computed in numpy."""
    def den(z, lam):
        return torch.full_like(z, 2.0) + 0.1 * z, torch.full_like(z, 7.0)  # x out of range, eps inconsistent
    rec = Recorder(den)
    z = _z(seed=4)
    samplers.ddim(rec, z, num_steps=2)
    a_t, s_t = np_alpha_sigma(np_logsnr(1.0))
    a_s, s_s = np_alpha_sigma(np_logsnr(0.5))
    x_c = np.clip(2.0 + 0.1 * z.numpy(), -1, 1)
    z_s = a_s * x_c + s_s * (z.numpy() - a_t * x_c) / s_t
    np.testing.assert_allclose(rec.calls[1][0].numpy(), z_s, atol=1e-12)
    # without clipping the denoiser's own (x_hat, eps_hat) define the step
    rec2 = Recorder(den)
    samplers.ddim(rec2, z, num_steps=2, clip=False)
    np.testing.assert_allclose(rec2.calls[1][0].numpy(), a_s * (2.0 + 0.1 * z.numpy()) + s_s * 7.0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 16, 256])
def test_ddim_gaussian_oracle_is_the_linear_map_computed_independently(n):
    s2 = 0.25
    z = _z(seed=5)
    out = samplers.ddim(gaussian_oracle(s2), z, num_steps=n, clip=False)
    c = np_gaussian_ddim_gain(s2, n)
    np.testing.assert_allclose(out.numpy(), c * z.numpy(), rtol=1e-10, atol=1e-14)


def test_ddim_gaussian_oracle_many_steps_has_the_data_variance():
    s2 = 0.25
    n = 512
    c = np_gaussian_ddim_gain(s2, n)
    assert c**2 == pytest.approx(s2, rel=0.01)
    assert np_gaussian_ode_gain(s2, n) ** 2 == pytest.approx(s2, rel=0.01)
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = samplers.ddim(gaussian_oracle(s2), z, num_steps=n, clip=False)
    assert out.var().item() == pytest.approx(s2, rel=0.05)
    assert abs(out.mean().item()) < 0.02
    # one step collapses to the mean: x_hat(z_1) ~ alpha_1 s^2 z
    one = samplers.ddim(gaussian_oracle(s2), z, num_steps=1, clip=False)
    assert one.var().item() < 1e-6


def test_ddim_callback_and_float32():
    seen = []
    z = _z().float()
    out = samplers.ddim(point_oracle(torch.zeros(1, 2, 3, 3)), z, num_steps=4,
                        callback=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert out.dtype == torch.float32
