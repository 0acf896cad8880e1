"""Learning-rate schedules and the EMA of the weights (small pure functions)."""

from __future__ import annotations

import torch
from torch import Tensor


def warmup_lr(step: int, *, base_lr: float, warmup_steps: int) -> float:
    """lr(step) = base_lr * min(1, (step + 1) / warmup_steps)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def linear_anneal_lr(step: int, *, base_lr: float, total_steps: int) -> float:
    """lr(step) = base_lr * (1 - step / total_steps): linear decay to 0 over the round (paper)."""
    return base_lr * max(0.0, 1.0 - step / max(total_steps, 1))


@torch.no_grad()
def ema_update(ema: list[Tensor], params: list[Tensor], *, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place (one fused op for all tensors)."""
    torch._foreach_lerp_(ema, params, 1.0 - decay)

