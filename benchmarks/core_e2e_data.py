"""The 2-D end-to-end check's data and metric (benchmarks/core_e2e.py).

Data: a mixture of 8 Gaussians, x = 0.75 (cos 2 pi k / 8, sin 2 pi k / 8) + 0.05 e, k ~ U{0..7}, e ~ N(0, I_2),
clamped to [-1, 1]^2; points travel as (B, 2, 1, 1) tensors so the (B, C, H, W) code paths are exercised.

Metric: the energy distance D(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (float64; the within-sample means
leave the diagonal out, so they are unbiased and D of two samples of one distribution can be slightly negative).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def sample_data(n: int, *, generator: torch.Generator) -> Tensor:
    """Mixture of 8 Gaussians (std 0.05) on a circle of radius 0.75: (n, 2, 1, 1) in [-1, 1]."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.double() * (2 * math.pi / 8)
    centers = 0.75 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # (n, 2)
    x = centers + 0.05 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return x.clamp(-1, 1).float().reshape(n, 2, 1, 1)  # (n, 2, 1, 1)


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (float64; within-sample terms exclude the diagonal)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)

    def mean_dist(p, q, *, same):
        d = np.sqrt(np.maximum(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1), 0.0))
        if same:
            n = len(p)
            return d.sum() / (n * (n - 1))
        return d.mean()

    return float(2 * mean_dist(a, b, same=False) - mean_dist(a, a, same=True) - mean_dist(b, b, same=True))
