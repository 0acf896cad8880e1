"""An independent float64 numpy teacher and two-step DDIM for the progressive distillation tests: the target
x_tilde the student's one step must land on (Algorithm 2)."""

from __future__ import annotations

import numpy as np
import torch

from tests.reference import np_alpha_sigma, np_logsnr

C, H, W = 3, 2, 2
LMIN, LMAX = -20.0, 20.0


class NumpyTeacher:
    """A random smooth teacher. ``consistent``: eps_hat derived from x_hat (as every parameterization
    does); otherwise an arbitrary, inconsistent (x_hat, eps_hat) pair from two unrelated functions.
    x_hat is scaled to exceed [-1, 1], so any clipping inside distillation would show."""

    def __init__(self, seed: int, *, consistent: bool):
        rng = np.random.default_rng(seed)
        self.w1 = rng.normal(size=(C, C)) * 0.8
        self.w2 = rng.normal(size=(C, C)) * 0.8
        self.c1 = rng.normal(size=(C,))
        self.c2 = rng.normal(size=(C,))
        self.consistent = consistent
        self.calls = 0

    def __call__(self, z: np.ndarray, lam: np.ndarray):  # z (B, C, H, W), lam (B,)
        self.calls += 1
        f = np.sin(lam / 5.0)[:, None, None, None] * self.c1[None, :, None, None]
        x_hat = 2.5 * np.tanh(np.einsum("oc,bchw->bohw", self.w1, z) + f)
        alpha, sigma = (v[:, None, None, None] for v in np_alpha_sigma(lam))
        if self.consistent:
            eps_hat = (z - alpha * x_hat) / sigma
        else:
            g = np.cos(lam / 3.0)[:, None, None, None] * self.c2[None, :, None, None]
            eps_hat = np.tanh(np.einsum("oc,bchw->bohw", self.w2, z) + g) + 0.1 * z
        return x_hat, eps_hat

    def torch(self):
        """The same teacher as a torch DenoiserFn (float64 in, float64 out)."""
        def fn(z: torch.Tensor, lam: torch.Tensor):
            assert z.dtype == torch.float64 and lam.shape == (z.shape[0],)
            x_hat, eps_hat = self(z.numpy(), lam.numpy())
            return torch.from_numpy(x_hat), torch.from_numpy(eps_hat)
        return fn


def np_two_step(teacher, z, t, n):
    """Teacher DDIM t -> t - 0.5/N -> t - 1/N, no clipping; returns (z_t'', x_hat at t')."""
    lam_t, lam_m, lam_s = np_logsnr(t), np_logsnr(t - 0.5 / n), np_logsnr(t - 1.0 / n)
    a_m, s_m = (v[:, None, None, None] for v in np_alpha_sigma(lam_m))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(lam_s))
    x1, e1 = teacher(z, lam_t)
    z_mid = a_m * x1 + s_m * e1
    x2, e2 = teacher(z_mid, lam_m)
    return a_s * x2 + s_s * e2, x2


def np_student_step(x_tilde, z, t, n):
    """One student DDIM step t -> t - 1/N with x_hat = x_tilde and eps_hat = (z - alpha_t x_tilde) / sigma_t."""
    a_t, s_t = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t)))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t - 1.0 / n)))
    return a_s * x_tilde + s_s * (z - a_t * x_tilde) / s_t


def _grid_times(n: int, rng: np.random.Generator, size: int, *, include_first: bool) -> np.ndarray:
    lo = 0 if include_first else 1
    i = rng.integers(lo, n, size=size) if n > lo else np.zeros(size, dtype=int)
    i[0] = n - 1  # always include t = 1 (the hardest: alpha_t = 4.5e-5)
    if n > 1 and not include_first:
        i[1] = 1
    return (i + 1) / n
