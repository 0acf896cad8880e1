"""Noise schedules as log-SNR over continuous time: the truncated cosine (Salimans & Ho 2022, official
``dpm.py``) and discrete DDPM tables (diffusers' ``alphas_cumprod``).

Notation: z_t = alpha_t x + sigma_t eps, alpha^2 + sigma^2 = 1, lambda = log(alpha^2 / sigma^2).
The module functions are the cosine schedule; :class:`CosineSchedule` and :class:`DiscreteSchedule`
are :class:`Schedule` objects that samplers and the distillation target take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

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


class Schedule(Protocol):
    """A noise schedule as log-SNR over continuous time: lambda(t) for t in [0, 1], decreasing, t = 1 the noise end.

    Everything else (alpha, sigma, DDIM, the distillation target) follows from lambda through
    :func:`alpha_sigma`, so samplers and the distillation target take any Schedule.
    """

    def logsnr(self, t: Tensor | float) -> Tensor:
        """lambda(t), with the range of t checked."""
        ...

    def logsnr_unchecked(self, t: Tensor) -> Tensor:
        """lambda(t) for t valid by construction (no host sync)."""
        ...

    def to_dict(self) -> dict:
        """JSON-able description (stored in checkpoint manifests); :func:`schedule_from_dict` inverts it."""
        ...


@dataclass(frozen=True)
class CosineSchedule:
    """The truncated cosine schedule: lambda(t) = -2 log tan(a t + b) between logsnr_max and logsnr_min."""

    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX

    def __post_init__(self) -> None:
        _cosine_constants(logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)  # checks min < max

    def logsnr(self, t: Tensor | float) -> Tensor:
        """:func:`logsnr` of this schedule."""
        return logsnr(t, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)

    def logsnr_unchecked(self, t: Tensor) -> Tensor:
        """:func:`logsnr_unchecked` of this schedule."""
        return logsnr_unchecked(t, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)

    def to_dict(self) -> dict:
        """``{"kind": "cosine", "logsnr_min": ..., "logsnr_max": ...}``."""
        return {"kind": "cosine", "logsnr_min": float(self.logsnr_min), "logsnr_max": float(self.logsnr_max)}


COSINE = CosineSchedule()  # the default schedule of every function that takes one


class DiscreteSchedule:
    """A DDPM-style schedule given by its table alpha_bar_k (``alphas_cumprod``), k = 0 .. T - 1.

    lambda_k = log(alpha_bar_k / (1 - alpha_bar_k)). Continuous time maps to the integer timestep
    tau(t) = round(t T) - 1 (round half to even, as numpy), so the N-step grid t_i = i / N lands on
    diffusers' "trailing" timesteps round(i T / N) - 1 at every N (exactly diffusers'
    ``set_timesteps`` whenever T / N is a binary fraction: every power-of-two N and every N dividing
    T), and the grid of N / 2 steps is every other point of the grid of N (the same t, the same
    tau): a distilled student walks timesteps its teacher was trained on. t = 0 is the clean end,
    alpha = 1, lambda = +inf, as with ``set_alpha_to_one``; times 0 < t < 1 / T are finer than the
    model's timesteps and are refused by :meth:`logsnr`. :meth:`timestep` inverts the map for the
    network's time input. Where a DDIM step lands is :func:`ddim_destination`.
    """

    def __init__(self, alphas_cumprod: Tensor | list[float]):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if acp.numel() < 2 or not bool(((acp > 0) & (acp < 1)).all()):
            raise ValueError("alphas_cumprod must hold at least 2 values, each in (0, 1)")
        lam = torch.log(acp) - torch.log1p(-acp)  # (T,)
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing (more noise at every later timestep)")
        self.alphas_cumprod = acp
        self.table = lam  # lambda_k, float64, decreasing

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.table.numel())

    def __repr__(self) -> str:
        return f"DiscreteSchedule(T={self.num_timesteps}, lambda {self.table[0]:.3g} .. {self.table[-1]:.3g})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiscreteSchedule) and torch.equal(self.alphas_cumprod, other.alphas_cumprod)

    def __hash__(self) -> int:
        return hash((self.num_timesteps, float(self.alphas_cumprod.sum())))

    def logsnr(self, t: Tensor | float) -> Tensor:
        """lambda(t); t must be 0 or lie in [1 / T, 1]."""
        t = as_tensor(t)
        if t.numel():
            bad = (t < 0) | (t > 1) | torch.isnan(t) | ((t > 0) & (t.double() * self.num_timesteps < 1 - 1e-4))
            if bool(bad.any()):
                raise ValueError(f"t must be 0 or lie in [1/T, 1] with T = {self.num_timesteps} timesteps; got values "
                                 f"in [{t.min().item()}, {t.max().item()}] (a grid finer than the model's timesteps)")
        return self.logsnr_unchecked(t)

    def timesteps(self, t: Tensor) -> Tensor:
        """tau(t) = round(t T) - 1 (int64, clamped to [0, T - 1]); t = 0 maps to 0 (the clean end is lambda = +inf)."""
        return (torch.round(t.double() * self.num_timesteps) - 1.0).clamp(0.0, self.num_timesteps - 1.0).long()

    def logsnr_unchecked(self, t: Tensor) -> Tensor:
        """lambda_{tau(t)}; +inf at t = 0, lambda_0 for 0 < t < 1 / T."""
        lam = self.table.to(t.device)[self.timesteps(t)]
        lam = torch.where(t == 0, torch.full_like(lam, math.inf), lam)
        return lam.to(t.dtype)

    def timestep(self, lam: Tensor) -> Tensor:
        """The timestep tau whose log-SNR is ``lam``, float32: linear in tau between table points, and the
        integer k itself where ``lam`` is lambda_k up to float32 round-off (within 1e-3 of a timestep)."""
        table = self.table.to(lam.device)
        lam64 = lam.double().clamp(min=float(table[-1]), max=float(table[0]))
        # table is decreasing: searchsorted on -table (increasing) gives the segment [lo, lo + 1] holding lam
        hi = torch.searchsorted(-table, -lam64.contiguous(), right=False).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        tau = lo.double() + (table[lo] - lam64) / (table[lo] - table[hi])
        nearest = torch.round(tau)
        return torch.where((tau - nearest).abs() < 1e-3, nearest, tau).float()

    def to_dict(self) -> dict:
        """``{"kind": "discrete", "alphas_cumprod": [...]}``."""
        return {"kind": "discrete", "alphas_cumprod": [float(v) for v in self.alphas_cumprod]}


def ddim_destination(schedule: Schedule, t: Tensor, *, num_steps: int) -> Tensor:
    """The log-SNR where one DDIM step of an N-step sampler from grid time t (in {1/N, ..., 1}) lands.

    +inf means the clean end: the step returns x_hat. Continuous schedules: lambda(t - 1/N), and +inf
    from t = 1/N. :class:`DiscreteSchedule`: diffusers' ``DDIMScheduler.step`` rule, timestep
    k = tau(t) - T // N, lambda_k (+inf when k < 0, ``set_alpha_to_one``); that is the next grid point
    tau(t - 1/N) whenever N divides T, and so a student sampled this way is diffusers' DDIM at every N.
    """
    check_num_steps("num_steps", num_steps)
    t = as_tensor(t)
    if isinstance(schedule, DiscreteSchedule):
        k = schedule.timesteps(t) - schedule.num_timesteps // num_steps
        lam = schedule.table.to(t.device)[k.clamp(min=0)]
        return torch.where(k < 0, torch.full_like(lam, math.inf), lam).to(t.dtype)
    s = (t.double() - 1.0 / num_steps).clamp(min=0.0)
    lam = schedule.logsnr_unchecked(s.to(t.dtype))
    return torch.where(s * num_steps < 0.5, torch.full_like(lam, math.inf), lam)


def schedule_from_dict(d: dict | None) -> Schedule:
    """Inverse of ``Schedule.to_dict``; None (manifests written before schedules were recorded) is the cosine."""
    if d is None:
        return COSINE
    kind = d.get("kind")
    if kind == "cosine":
        return CosineSchedule(logsnr_min=float(d["logsnr_min"]), logsnr_max=float(d["logsnr_max"]))
    if kind == "discrete":
        return DiscreteSchedule(d["alphas_cumprod"])
    raise ValueError(f"schedule kind must be 'cosine' or 'discrete'; got {kind!r}")


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def ddpm_alphas_cumprod(*, beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                        beta_end: float = 0.02) -> Tensor:
    """alpha_bar_k = prod_{j <= k} (1 - beta_j) for diffusers' beta schedules (float64).

    ``linear``: beta evenly spaced in [beta_start, beta_end]; ``scaled_linear``: sqrt(beta) evenly
    spaced; ``squaredcos_cap_v2``: beta_k = min(1 - f(k + 1) / f(k), 0.999) with
    f(u) = cos((u / T + 0.008) / 1.008 * pi / 2)^2 (Nichol & Dhariwal's cosine).
    """
    check_num_steps("num_train_timesteps", num_train_timesteps)
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def f(u: float) -> float:
            return math.cos((u / n + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f(k + 1) / f(k), 0.999) for k in range(n)], dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}; got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)
