"""Argument checks shared by the math modules: errors name the argument and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core.kinds import check_kind  # noqa: F401  (re-exported: the checks live together)


def check_batch_vector(name: str, value: Tensor, *, batch: int) -> None:
    """Raise ValueError unless ``value`` is a tensor of shape (batch,)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape ({batch},); got {type(value).__name__}")
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one value per example); got {tuple(value.shape)}")


def check_image_batch(name: str, value: Tensor) -> None:
    """Raise ValueError unless ``value`` is a (B, ...) tensor with at least one example dimension."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, H, W); got {type(value).__name__}")
    if value.ndim < 2 or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, ...) with B >= 1; got {tuple(value.shape)}")


def check_num_steps(name: str, value: int) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def broadcast_to(value: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example vector (B,) so it broadcasts against ``like`` (B, ...)."""
    return value.reshape(value.shape[0], *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def as_tensor(value: Tensor | float, *, like: Tensor | None = None) -> Tensor:
    """Return ``value`` as a floating tensor (keeping float64 when given float64)."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else value.to(torch.get_default_dtype())
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return torch.as_tensor(value, dtype=dtype, device=device)


def state_misfit(tensors: dict[str, Tensor], want: dict[str, tuple[int, ...]]) -> str | None:
    """None when ``tensors`` have exactly the names and shapes of ``want``; else the first misfit and a count."""
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    wrong = [k for k in want if k in have and have[k] != want[k]]
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if not (wrong or missing or extra):
        return None
    if wrong:
        first = f"{wrong[0]} has shape {list(have[wrong[0]])}, the architecture needs {list(want[wrong[0]])}"
    else:
        first = f"{missing[0]} is missing" if missing else f"{extra[0]} is not part of the architecture"
    return f"{first}; {len(wrong) + len(missing) + len(extra)} tensor(s) differ"
