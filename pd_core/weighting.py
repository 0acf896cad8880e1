"""Loss weightings over the x-error (per example: mean over pixels, then weight).

With SNR = exp(lambda) = alpha^2 / sigma^2 and eps_hat derived from x_hat:
- ``constant``:     ||x_hat - x||^2
- ``snr``:          ||eps_hat - eps||^2 = SNR * ||x_hat - x||^2
- ``snr_trunc``:    max(||x_hat - x||^2, ||eps_hat - eps||^2) = max(SNR, 1) * ||x_hat - x||^2
- ``snr_plus_one``: ||v_hat - v||^2 = (1 + SNR) * ||x_hat - x||^2
"""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core._checks import check_batch_vector, check_image_batch, check_kind
from pd_core.kinds import WEIGHTINGS, check_combination  # noqa: F401  (check_combination: public here too)

KINDS = WEIGHTINGS


def weight(logsnr: Tensor, *, kind: str) -> Tensor:
    """w(lambda) such that loss = w * ||x_hat - x||^2; see the module docstring."""
    check_kind("kind", kind, KINDS)
    snr = torch.exp(logsnr)
    if kind == "constant":
        return torch.ones_like(snr)
    if kind == "snr":
        return snr
    if kind == "snr_trunc":
        return torch.clamp(snr, min=1.0)
    return 1.0 + snr


def per_example_loss(*, x_hat: Tensor, x: Tensor, logsnr: Tensor, kind: str) -> Tensor:
    """w(lambda) * mean over pixels of (x_hat - x)^2, shape (B,)."""
    check_kind("kind", kind, KINDS)
    check_image_batch("x", x)
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat must have the shape of x {tuple(x.shape)}; got {tuple(x_hat.shape)}")
    check_batch_vector("logsnr", logsnr, batch=x.shape[0])
    x_mse = (x_hat - x).square().flatten(1).mean(dim=1)  # (B,)
    return weight(logsnr.to(x_mse.dtype), kind=kind) * x_mse
