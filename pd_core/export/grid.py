"""The constants of an N-step DDIM sampler as the samplers compute them: log-SNR, alpha, sigma, network time.

``pd_core.samplers.ddim`` walks lambda_i = lambda(i / N), i = N .. 0, computed in float64 and cast
to the sample's dtype (float32); alpha_i = sqrt(sigmoid(lambda_i)), sigma_i = sqrt(sigmoid(-lambda_i))
in that dtype. An exported sampler that reuses these float32 values performs the same arithmetic.
For a diffusers UNet2DModel the network's input at step i is the fractional timestep
tau_i = DiscreteSchedule.timestep(lambda_i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pd_core._checks import check_num_steps
from pd_core.schedule import DiscreteSchedule, Schedule, alpha_sigma


@dataclass(frozen=True)
class SamplerGrid:
    """Per grid point i = 0 .. N (t = i / N): log-SNR, alpha, sigma (float32) and, for discrete schedules, tau."""

    steps: int
    logsnr: Tensor  # (N + 1,) float32; +inf at i = 0 for a discrete schedule
    alpha: Tensor  # (N + 1,) float32
    sigma: Tensor  # (N + 1,) float32
    timestep: Tensor | None  # (N + 1,) float32 fractional timesteps (None for the cosine schedule); [0] unused


def sampler_grid(schedule: Schedule, *, steps: int, dtype: torch.dtype = torch.float32) -> SamplerGrid:
    """The grid of an N-step sampler over ``schedule``, in ``dtype`` as the samplers compute it."""
    check_num_steps("steps", steps)
    lam = schedule.logsnr(torch.arange(steps + 1, dtype=torch.float64) / steps).to(dtype)  # (N + 1,)
    alpha, sigma = alpha_sigma(lam)
    tau = schedule.timestep(lam) if isinstance(schedule, DiscreteSchedule) else None
    return SamplerGrid(steps=steps, logsnr=lam, alpha=alpha, sigma=sigma, timestep=tau)
