"""Truncated cosine log-SNR schedule (Salimans & Ho 2022, official ``dpm.py``).

Notation: z_t = alpha_t x + sigma_t eps, alpha^2 + sigma^2 = 1, lambda = log(alpha^2 / sigma^2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pd_core._checks import as_tensor, check_num_steps

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def _cosine_constants(*, logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """b = arctan(exp(-lambda_max / 2)), a = arctan(exp(-lambda_min / 2)) - b."""
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min must be < logsnr_max; got {logsnr_min} and {logsnr_max}")
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return a, b


def logsnr(t: Tensor | float, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> Tensor:
    """lambda(t) = -2 log tan(a t + b): lambda(0) = logsnr_max, lambda(1) = logsnr_min.

    ``t`` may have any shape; values must lie in [0, 1].
    """
    t = as_tensor(t)
    if t.numel() and (bool((t < 0).any()) or bool((t > 1).any()) or bool(torch.isnan(t).any())):
        raise ValueError(f"t must lie in [0, 1]; got values in [{t.min().item()}, {t.max().item()}]")
    return logsnr_unchecked(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def logsnr_unchecked(t: Tensor, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> Tensor:
    """:func:`logsnr` without the range check, which reads the tensor on the host (a GPU sync).

    For training loops whose t lies in [0, 1] by construction; everything else calls :func:`logsnr`.
    """
    a, b = _cosine_constants(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    # float64 inside: near t = 1, tan(a t + b) sits next to its pole and float32 loses ~1e-3 in lambda.
    return (-2.0 * torch.log(torch.tan(a * t.double() + b))).to(t.dtype)


def t_from_logsnr(lam: Tensor, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> Tensor:
    """Inverse of :func:`logsnr`: t = (arctan(exp(-lambda / 2)) - b) / a."""
    a, b = _cosine_constants(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    lam = as_tensor(lam)
    return ((torch.atan(torch.exp(-0.5 * lam.double())) - b) / a).to(lam.dtype)


def alpha_sigma(lam: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)).

    Computed from lambda, not from cos/sin of t, so alpha never reaches exactly 0.
    """
    lam = as_tensor(lam)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def network_time_input(lam: Tensor) -> Tensor:
    """phi = arctan(exp(-lambda / 2)) / (pi / 2): the network's time input (about t for the cosine schedule).

    lambda is clipped to [-20, 20] first, as in the official U-Net.
    """
    lam = as_tensor(lam).clamp(LOGSNR_MIN, LOGSNR_MAX)
    return torch.atan(torch.exp(-0.5 * lam)) / (0.5 * math.pi)


def time_grid(num_steps: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
    """The student's time grid t_i = i / N, i = 0..N (shape (N + 1,)); step i walks t_{i+1} -> t_i."""
    check_num_steps("num_steps", num_steps)
    return torch.arange(num_steps + 1, dtype=dtype, device=device) / num_steps
