"""Where and how the training and sampling loops run: device, autocast precision, memory format, compile."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pd_core import dist
from pd_core.config import RuntimeConfig

log = logging.getLogger("pd_core.train")


@dataclass(frozen=True)
class Runtime:
    """Where and how the hot loop runs."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    compile: bool
    rank: int = 0  # this process's rank in a data-parallel job
    world_size: int = 1  # processes in the job (1: no DistributedDataParallel)

    @property
    def is_cuda(self) -> bool:
        """True on a CUDA device."""
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, reports progress and writes checkpoints."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``autocast_dtype`` on the runtime's device (a no-op context in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_device(name: str) -> torch.device:
    """The device for ``auto`` / ``cpu`` / ``cuda``: auto is CUDA when available, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_runtime(runtime_cfg: RuntimeConfig) -> Runtime:
    """Runtime from a RuntimeConfig: bf16 autocast and channels_last only where a GPU is present.

    Inside a process group (torchrun) the Runtime carries rank and world size, and on CUDA the
    device is GPU ``LOCAL_RANK``.
    """
    try:
        device = resolve_device(runtime_cfg.device)
    except ValueError:
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available; "
                         "use runtime.device=auto or cpu") from None
    info = dist.current()
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if runtime_cfg.precision == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast_dtype = dtypes[runtime_cfg.precision]
    channels_last = runtime_cfg.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda"
    if autocast_dtype == torch.float16:
        log.warning("runtime.precision=fp16 autocasts without loss scaling (gradients may underflow); "
                    "bf16 needs none and is the default on GPUs")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv algorithms once
    if runtime_cfg.threads:
        torch.set_num_threads(runtime_cfg.threads)
    return Runtime(device=device, autocast_dtype=autocast_dtype, channels_last=bool(channels_last),
                   compile=runtime_cfg.compile, rank=info.rank, world_size=info.world_size)


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters (fused into one kernel on CUDA)."""
    kwargs = {"fused": True} if runtime.is_cuda else {}  # one kernel for all parameters instead of a loop
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kwargs)


def prepare_module(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` on the runtime's device, in channels_last where the runtime asks for it."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(fn: Callable, runtime: Runtime) -> Callable:
    """``torch.compile(fn)`` when ``runtime.compile``, else ``fn``."""
    return torch.compile(fn) if runtime.compile else fn

