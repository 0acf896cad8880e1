"""Oracle denoisers whose outputs are known in closed form, and float64 references of what the samplers make of
them: the sampler tests' shared helpers."""

from __future__ import annotations

import numpy as np
import torch

from tests.reference import np_alpha_sigma, np_logsnr

LMIN, LMAX = -20.0, 20.0


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


class Recorder:
    """Wrap a denoiser; record every (z, logsnr) it is called with."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, z, lam):
        assert lam.shape == (z.shape[0],), "samplers must pass logsnr of shape (B,)"
        self.calls.append((z.clone(), lam.clone()))
        return self.fn(z, lam)


def point_oracle(x0: torch.Tensor):
    """Data set = the single point x0: x_hat = x0 always, eps_hat = (z - alpha x0) / sigma."""
    def fn(z, lam):
        a = _col(torch.sigmoid(lam).sqrt())
        s = _col(torch.sigmoid(-lam).sqrt())
        x_hat = x0.expand_as(z).clone()
        return x_hat, (z - a * x_hat) / s
    return fn


def gaussian_oracle(s2: float):
    """Data N(0, s^2 I): E[x | z] = alpha s^2 / (alpha^2 s^2 + sigma^2) z exactly."""
    def fn(z, lam):
        a2 = _col(torch.sigmoid(lam))
        sg2 = _col(torch.sigmoid(-lam))
        x_hat = a2.sqrt() * s2 / (a2 * s2 + sg2) * z
        return x_hat, (z - a2.sqrt() * x_hat) / sg2.sqrt()
    return fn


def np_gaussian_ddim_gain(s2: float, n: int) -> float:
    """DDIM with the Gaussian oracle is linear, x = c z_1; c by an independent scalar recursion."""
    c = 1.0  # z = c z_1
    for i in range(n - 1, -1, -1):
        a_t, s_t = np_alpha_sigma(np_logsnr((i + 1) / n))
        k = a_t * s2 / (a_t**2 * s2 + s_t**2)  # x_hat = k z
        if i == 0:
            return k * c
        a_s, s_s = np_alpha_sigma(np_logsnr(i / n))
        c = (a_s * k + s_s * (1 - a_t * k) / s_t) * c
    raise AssertionError


def np_gaussian_ode_gain(s2: float, n: int) -> float:
    """Exact probability-flow ODE from t = 1 to t = 1/N, then x_hat: y = z/alpha, eta = sigma/alpha,
    y(eta) = y_1 sqrt((s^2 + eta^2) / (s^2 + eta_1^2)), x_hat = s^2 / (s^2 + eta^2) y."""
    a1, s1 = np_alpha_sigma(np_logsnr(1.0))
    a, s = np_alpha_sigma(np_logsnr(1.0 / n))
    eta1, eta = s1 / a1, s / a
    return float(s2 / np.sqrt((s2 + eta**2) * (s2 + eta1**2)) / a1)


def _z(shape=(4, 2, 3, 3), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
