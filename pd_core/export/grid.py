"""The constants of an N-step DDIM sampler: log-SNR, alpha, sigma, network time, and where each step lands.

``pd_core.samplers.ddim`` evaluates the network at lambda_i = lambda(i / N), i = N .. 1, and step i
lands at :func:`pd_core.schedule.ddim_destination` (lambda(t - 1/N), or diffusers' DDIM rule on a
discrete schedule; +inf = the clean end, where the step returns x_hat). Every coefficient is
computed in float64 from lambda, alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)), and
rounded once to float32, so an exported graph holds no Sigmoid of an extreme log-SNR (lambda reaches
-20 on our cosine schedule and on ``squaredcos_cap_v2``, where a float32 Sigmoid kernel may return 0).
For a diffusers UNet2DModel the network's input at grid point i is the integer timestep
tau_i = DiscreteSchedule.timesteps(i / N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pd_core._checks import check_num_steps
from pd_core.schedule import DiscreteSchedule, Schedule, ddim_destination


@dataclass(frozen=True)
class SamplerGrid:
    """Per grid point i = 0 .. N (t = i / N) and per step i = 0 .. N - 1 (from t = (i + 1) / N), float32."""

    steps: int
    logsnr: Tensor  # (N + 1,); +inf at i = 0 for a discrete schedule
    alpha: Tensor  # (N + 1,) computed in float64
    sigma: Tensor  # (N + 1,) computed in float64
    timestep: Tensor | None  # (N + 1,) integer timesteps as floats (None for continuous schedules); [0] unused
    dest_alpha: Tensor  # (N,) alpha where step i lands (1 at the clean end)
    dest_sigma: Tensor  # (N,) sigma where step i lands (0 at the clean end)
    dest_clean: tuple[bool, ...]  # (N,) whether step i lands on the clean end (returns x_hat)


def alpha_sigma64(lam: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)) in float64 (alpha = 1, sigma = 0 at +inf)."""
    lam = lam.double()
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def sampler_grid(schedule: Schedule, *, steps: int, dtype: torch.dtype = torch.float32) -> SamplerGrid:
    """The grid of an N-step DDIM sampler over ``schedule``: float64 arithmetic, rounded once to ``dtype``."""
    check_num_steps("steps", steps)
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    lam = schedule.logsnr(t)  # (N + 1,) float64
    alpha, sigma = alpha_sigma64(lam)
    dest = ddim_destination(schedule, t[1:], num_steps=steps)  # (N,)
    dest_alpha, dest_sigma = alpha_sigma64(dest)
    tau = schedule.timesteps(t).double() if isinstance(schedule, DiscreteSchedule) else None
    return SamplerGrid(steps=steps, logsnr=lam.to(dtype), alpha=alpha.to(dtype), sigma=sigma.to(dtype),
                       timestep=None if tau is None else tau.to(dtype), dest_alpha=dest_alpha.to(dtype),
                       dest_sigma=dest_sigma.to(dtype), dest_clean=tuple(math.isinf(v) for v in dest.tolist()))
