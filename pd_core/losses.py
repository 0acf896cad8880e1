"""Teacher (diffusion) loss: continuous time t ~ U[0, 1), z_t = alpha_t x + sigma_t eps."""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core._checks import broadcast_to, check_image_batch
from pd_core.denoiser import Denoiser
from pd_core.schedule import COSINE, Schedule, alpha_sigma
from pd_core.weighting import check_combination, per_example_loss


class TeacherLoss:
    """Per-example diffusion loss w(lambda_t) ||x_hat(z_t) - x||^2 with t ~ U[0, 1) (no clipping)."""

    def __init__(self, *, weighting: str, schedule: Schedule = COSINE):
        self.weighting = weighting
        self.schedule = schedule

    def __call__(self, model: Denoiser, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        check_image_batch("x", x)
        check_combination(parameterization=model.parameterization, weighting=self.weighting)
        t = torch.rand(x.shape[0], device=x.device, dtype=x.dtype, generator=generator)  # (B,)
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        # t in [0, 1) by construction: no range check (it would sync with the device)
        lam = self.schedule.logsnr_unchecked(t)
        alpha, sigma = (broadcast_to(s, x) for s in alpha_sigma(lam))
        x_hat, _ = model(alpha * x + sigma * eps, lam)
        return per_example_loss(x_hat=x_hat.float(), x=x.float(), logsnr=lam.float(), kind=self.weighting)
