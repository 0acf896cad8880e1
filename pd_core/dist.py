"""Process-group primitives for data-parallel training under torchrun (NCCL on GPUs, gloo on CPUs).

A plain ``python`` run has no process group: every function here then behaves as rank 0 of 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from pd_core.data import derive_seed

T = TypeVar("T")


class DistributedJobError(RuntimeError):
    """A data-parallel job failed in a way that has no more specific error type."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank r of world_size processes, local_rank r on this host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, reports progress and writes checkpoints."""
        return self.rank == 0


def current() -> DistInfo:
    """The process group's view of this process ((0, 1, 0) when there is no process group)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", torch_dist.get_rank())))


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(*, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain ``python`` run) there is nothing to join: returns (0, 1, 0).
    On CUDA each process takes GPU ``LOCAL_RANK``.
    """
    if torch_dist.is_initialized():
        return current()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistInfo()
    backend = backend or default_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedJobError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                                      f"visible; lower runtime.nproc")
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend=backend, init_method="env://")
    return current()


def teardown() -> None:
    """Leave the process group (no-op without one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s generators: ``seed`` on rank 0 (one process is unchanged), derived elsewhere."""
    return seed if rank == 0 else derive_seed(seed, "rank", rank)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over the processes (``value`` itself without a process group)."""
    info = current()
    if info.world_size == 1:
        return value
    out = value.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / info.world_size


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), on every rank; ``[value]`` without a process group."""
    info = current()
    if info.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(gathered, value)
    return gathered


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank (a collective; every rank must call it).

    If ``fn`` raises on rank 0, rank 0 re-raises it and the other ranks raise
    :class:`DistributedJobError` with its message, so no rank waits forever.
    """
    info = current()
    if info.world_size == 1:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if info.is_main:
        try:
            payload[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - every rank must leave the collective, then raise
            error = err
            payload[0] = ("error", f"{type(err).__name__}: {err}")
    torch_dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        if error is not None:
            raise error
        raise DistributedJobError(f"rank 0 failed: {value}")
    return value
