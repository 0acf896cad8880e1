"""Where and how the training and sampling loops run: device, autocast precision, memory format, compile."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pd_core import dist
from pd_core.config import RuntimeConfig
from pd_core.train.threads import AdaptiveThreads, adaptive_threads

log = logging.getLogger("pd_core.train")

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # native bf16 dot products / tiles on x86


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text (empty when it lists none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_supports_bf16(cpuinfo_path: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU lists avx512_bf16 or amx_bf16; False when it does not, or when nothing says (never assumed)."""
    try:
        text = Path(cpuinfo_path).read_text()
    except OSError:
        return False
    return bool(cpu_flags(text) & BF16_CPU_FLAGS)


def autocast_dtype_for(precision: str, *, device: torch.device, cpu_bf16: bool) -> torch.dtype | None:
    """The autocast dtype for ``runtime.precision`` on ``device`` (None: fp32, no autocast).

    ``auto`` is bf16 on CUDA, and on a CPU with native bf16 (``cpu_bf16``: avx512_bf16 or
    amx_bf16), where bf16 training and sampling measured faster than fp32 (benchmarks/speed);
    fp32 on other CPUs, where bf16 is emulated. ``fp32`` turns autocast off everywhere.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass(frozen=True)
class Runtime:
    """Where and how the hot loop runs."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    compile: bool
    rank: int = 0  # this process's rank in a data-parallel job
    world_size: int = 1  # processes in the job (1: no DistributedDataParallel)
    nodes: int = 1  # nodes the world_size processes run on: each process takes batch_size / nodes examples
    threads: AdaptiveThreads | None = None  # runtime.threads null on a CPU: threads follow the machine's load

    def follow_load(self) -> None:
        """Re-decide the thread count where it follows the load (a clock check until a window has passed)."""
        if self.threads is not None:
            self.threads.update()

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
    """Runtime from a RuntimeConfig: bf16 autocast where the hardware has it (see :func:`autocast_dtype_for`),
    channels_last only on a GPU (on a CPU it is slower, with bf16 too), ``runtime.threads`` torch threads
    or, when null on a CPU, as many as the machine's load leaves free (:mod:`pd_core.train.threads`).

    Inside a process group (torchrun) the Runtime carries rank, world size and ``runtime.nodes`` (a
    job of several nodes must have nodes x nproc processes), and on CUDA the device is GPU ``LOCAL_RANK``.
    """
    try:
        device = resolve_device(runtime_cfg.device)
    except ValueError:
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available; "
                         "use runtime.device=auto or cpu") from None
    info = dist.current()
    nodes = runtime_cfg.nodes if info.world_size > 1 else 1
    if nodes > 1 and info.world_size != nodes * runtime_cfg.nproc:
        raise dist.DistributedJobError(f"the job has {info.world_size} processes but runtime.nodes x runtime.nproc = "
                                       f"{nodes} x {runtime_cfg.nproc}; start torchrun with --nnodes={nodes} "
                                       f"--nproc-per-node={runtime_cfg.nproc}")
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    autocast_dtype = autocast_dtype_for(runtime_cfg.precision, device=device,
                                        cpu_bf16=device.type == "cpu" and cpu_supports_bf16())
    channels_last = runtime_cfg.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda"
    if autocast_dtype == torch.float16:
        log.warning("runtime.precision=fp16 autocasts without loss scaling (gradients may underflow); "
                    "bf16 needs none and is the default on GPUs")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv algorithms once
    threads = None
    if runtime_cfg.threads:
        torch.set_num_threads(runtime_cfg.threads)
    elif device.type == "cpu":
        threads = adaptive_threads()
    return Runtime(device=device, autocast_dtype=autocast_dtype, channels_last=bool(channels_last),
                   compile=runtime_cfg.compile, rank=info.rank, world_size=info.world_size, nodes=nodes,
                   threads=threads)


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, runtime: Runtime,
                   lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters (fused into one kernel on CUDA).

    ``lr_scales`` maps a submodule name (e.g. ``"guide_mlp"``) to a learning-rate multiplier: its
    parameters form a group with ``lr_scale``, which the training loop multiplies into each update's lr.
    """
    kwargs = {"fused": True} if runtime.is_cuda else {}  # one kernel for all parameters instead of a loop
    scales = lr_scales or {}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        scale = next((v for k, v in scales.items() if name == k or name.startswith(k + ".")), 1.0)
        groups.setdefault(scale, []).append(param)
    param_groups = [{"params": params, "lr_scale": scale} for scale, params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, **kwargs)


def prepare_module(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` on the runtime's device, in channels_last where the runtime asks for it."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(fn: Callable, runtime: Runtime) -> Callable:
    """``torch.compile(fn)`` when ``runtime.compile``, else ``fn``."""
    return torch.compile(fn) if runtime.compile else fn

