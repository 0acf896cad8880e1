"""Training engine: teacher training and distillation rounds, resumable, with progress callbacks.

Pure PyTorch; the Prefect task and the CLI drive these functions. A round's randomness comes from
(seed, step): batches are a stateless function of the step (``data.BatchSampler``), noise and
dropout draw from generators whose states are saved with every in-round checkpoint, so a killed
run that resumes ends with exactly the weights of an uninterrupted one (CPU).

Data-parallel (under torchrun, see ``pd_core.distributed``): when a process group is initialised,
:func:`resolve_runtime` records rank and world size, the model is wrapped in DistributedDataParallel,
rank r of W trains on batch k W + r of the single-process batch stream at update k (the W ranks
together see exactly the batches of one process with a W-times batch), noise/dropout generators are
seeded per rank, the logged loss is the mean over ranks, and progress and checkpoints happen on
rank 0 only (with every rank's generator states, so a resumed run continues each rank exactly).

GPU fast path (all guarded by the Runtime, none active on CPU by default): bf16 autocast around
the student step AND the teacher's two forward passes (the Denoiser casts network outputs back to
fp32, so the distillation target's arithmetic is fp32), channels_last, fused AdamW, optional
torch.compile (of the DDP-wrapped student and of the frozen teacher), no host syncs in the inner
loop (the loss is read every ``log_every`` updates; schedule checks that would sync are skipped
where t is valid by construction), and the whole dataset kept in device memory when it fits: a
batch is then an index_select on the device (indices and flips are a few hundred bytes, copied
asynchronously from pinned memory). That beats a pinned-memory DataLoader for these in-memory
datasets: no worker processes, no per-batch collation or pickling, no per-batch host-to-device
copy of the images (1.5 MB per CIFAR batch of 128), and batches stay a pure function of the step,
which exact resume relies on.
"""

from __future__ import annotations

import contextlib

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pd_core import distributed
from pd_core.data import BatchSampler, derive_seed
from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss
from pd_core.losses import TeacherLoss
from pd_core.parameterization import output_channels
from pd_core.unet import UNet, UNetSpec

log = logging.getLogger(__name__)

ProgressCallback = Callable[["ProgressEvent"], None]
CheckpointHook = Callable[["TrainState"], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stops and the last good checkpoint stays."""


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: what a bar, a log line or a Prefect artifact shows."""

    phase: str  # e.g. "teacher" or "round 3 (64->32)"
    step: int  # updates done
    total: int  # updates in this phase
    loss: float  # mean loss since the previous event
    lr: float
    it_per_s: float
    eta_s: float

    def line(self) -> str:
        """One log line: `round 3 (64->32) step 200/1000 loss 0.0123 lr 4.0e-05 8.1 it/s eta 1m39s`."""
        return (f"{self.phase} step {self.step}/{self.total} loss {self.loss:.4g} lr {self.lr:.2e} "
                f"{self.it_per_s:.2f} it/s eta {format_seconds(self.eta_s)}")


def format_seconds(seconds: float) -> str:
    """Human duration: 59s, 3m07s, 2h05m."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules and EMA (small pure functions)


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


# ----------------------------------------------------------------------------------------------
# Models


def unet_spec(model_cfg: Any, *, in_channels: int, image_size: int, parameterization: str, num_classes: int,
              dropout: float) -> UNetSpec:
    """UNetSpec from a ModelConfig (config.py) plus what the data and parameterization decide."""
    return UNetSpec(
        in_channels=in_channels,
        out_channels=output_channels(kind=parameterization, channels=in_channels),
        image_size=image_size,
        ch=model_cfg.ch,
        emb_ch=model_cfg.emb_ch or 4 * model_cfg.ch,
        ch_mult=tuple(model_cfg.ch_mult),
        num_res_blocks=model_cfg.num_res_blocks,
        attn_resolutions=tuple(model_cfg.attn_resolutions),
        num_heads=model_cfg.num_heads,
        head_dim=model_cfg.head_dim,
        dropout=dropout,
        resblock_resample=model_cfg.resblock_resample,
        num_classes=num_classes if model_cfg.class_conditional else 0,
        norm_groups=model_cfg.norm_groups,
    )


def spec_to_dict(spec: UNetSpec) -> dict:
    """JSON-able UNetSpec (stored in every checkpoint manifest so a checkpoint describes its net)."""
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> UNetSpec:
    """Inverse of :func:`spec_to_dict`; lists become tuples."""
    return UNetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------
# Runtime


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
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, reports progress and writes checkpoints."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(runtime_cfg: Any) -> Runtime:
    """Runtime from a RuntimeConfig: bf16 autocast and channels_last only where a GPU is present.

    Inside a process group (torchrun) the Runtime carries rank and world size, and on CUDA the
    device is GPU ``LOCAL_RANK``.
    """
    want = getattr(runtime_cfg, "device", "auto")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available; use runtime.device=auto or cpu")
    info = distributed.current()
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    precision = getattr(runtime_cfg, "precision", "auto")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast_dtype = dtypes[precision]
    channels_last = getattr(runtime_cfg, "channels_last", None)
    if channels_last is None:
        channels_last = device.type == "cuda"
    if autocast_dtype == torch.float16:
        log.warning("runtime.precision=fp16 autocasts without loss scaling (gradients may underflow); "
                    "bf16 needs none and is the default on GPUs")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv algorithms once
    threads = getattr(runtime_cfg, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    return Runtime(device=device, autocast_dtype=autocast_dtype, channels_last=bool(channels_last),
                   compile=bool(getattr(runtime_cfg, "compile", False)), rank=info.rank, world_size=info.world_size)


# ----------------------------------------------------------------------------------------------
# Training state (what an in-round checkpoint holds)


@dataclass
class TrainState:
    """Everything a resumed run needs: weights, optimizer, EMA, step and RNG states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: list[Tensor] | None
    step: int
    noise_generator: torch.Generator
    # data-parallel: every rank's generator states ({"noise", "torch"[, "cuda"]} per rank), gathered at each
    # checkpoint so that rank 0's saved state resumes every rank exactly; None in a single process
    rank_rng: list[dict[str, Tensor]] | None = None

    def rng_states(self) -> dict[str, Tensor]:
        """This process's generator states: the noise generator, torch's CPU RNG (dropout on CPU), CUDA's RNG."""
        states = {"noise": self.noise_generator.get_state().cpu(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        return states

    def _set_rng_states(self, states: dict[str, Tensor]) -> None:
        self.noise_generator.set_state(states["noise"].to(self.noise_generator.get_state().device))
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA weights as a state dict (the model's own weights when there is no EMA)."""
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            for (name, _), e in zip(self.model.named_parameters(), self.ema):
                sd[name] = e.detach().clone()
        return sd

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Flatten to (tensors, json meta) for ``CheckpointStore.save_state`` (no pickle)."""
        from pd_core.store import optimizer_state_to_tensors

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{i}": e.detach().cpu().contiguous() for i, e in enumerate(self.ema)})
        opt_tensors, opt_meta = optimizer_state_to_tensors(self.optimizer.state_dict())
        tensors.update({f"optim.{k}": v.cpu().contiguous() for k, v in opt_tensors.items()})
        tensors.update({f"rng.{k}": v for k, v in self.rng_states().items()})
        meta = {"step": self.step, "optimizer": opt_meta, "has_ema": self.ema is not None}
        if self.rank_rng is not None:
            for rank, states in enumerate(self.rank_rng):
                tensors.update({f"rng.rank{rank}.{k}": v.cpu() for k, v in states.items()})
            meta["world_size"] = len(self.rank_rng)
        return tensors, meta

    def load_tensors(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore from :meth:`to_tensors`' output."""
        from pd_core.store import tensors_to_optimizer_state

        device = next(self.model.parameters()).device
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            if not meta.get("has_ema"):
                raise ValueError("the saved training state has no EMA weights but this run uses EMA")
            for i, e in enumerate(self.ema):
                e.copy_(tensors[f"ema.{i}"].to(device))
        opt = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
        self.optimizer.load_state_dict(tensors_to_optimizer_state(opt, meta["optimizer"]))
        info = distributed.current()
        saved_world = int(meta.get("world_size", 1))
        if info.world_size == 1 and saved_world == 1:
            prefix = "rng."
        elif saved_world == info.world_size:
            prefix = f"rng.rank{info.rank}."
        else:
            prefix = "rng." if info.rank == 0 else None
            if info.is_main:
                log.warning("the saved training state was written by %d process(es), this run has %d: the batch stream "
                            "and the other ranks' noise continue differently than an uninterrupted run",
                            saved_world, info.world_size)
        if prefix is not None:
            self._set_rng_states({k[len(prefix):]: v for k, v in tensors.items()
                                  if k.startswith(prefix) and "." not in k[len(prefix):]})
        self.step = int(meta["step"])


# ----------------------------------------------------------------------------------------------
# The loop shared by teacher training and distillation

LossFn = Callable[[Tensor, Tensor | None], Tensor]  # (x (B, C, H, W), y (B,) or None) -> per-example loss (B,)
BatchFn = Callable[[int], tuple[Tensor, Tensor | None]]  # step -> (x, y)


@dataclass(frozen=True)
class LoopSpec:
    """Hyper-parameters of one training loop."""

    phase: str  # label for logs and errors, e.g. "round 3 (64->32)"
    total_steps: int
    lr_fn: Callable[[int], float]  # step -> learning rate
    grad_clip: float | None
    ema_decay: float | None
    log_every: int
    checkpoint_every: int


def _batches(sample_batch: BatchFn, start: int, stop: int) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    for step in range(start, stop):
        x, y = sample_batch(step)
        yield step, x, y


def train_step(*, state: TrainState, loss_fn: LossFn, x: Tensor, y: Tensor | None, lr: float, runtime: Runtime,
               params: list[Tensor], grad_clip: float | None = None, ema_decay: float | None = None,
               poison: bool = False) -> Tensor:
    """One update: loss = mean(loss_fn(x, y)) under autocast; backward; clip; AdamW step; EMA. Returns the
    detached loss (a device scalar: reading it is the caller's choice of when to sync).

    Under DistributedDataParallel the backward pass averages the gradients over the ranks.
    ``poison`` multiplies the loss by NaN (fault-injection tests only).
    """
    opt = state.optimizer
    for group in opt.param_groups:
        group["lr"] = lr
    with runtime.autocast():
        loss = loss_fn(x, y).mean()
    if poison:
        loss = loss * float("nan")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    if state.ema is not None and ema_decay is not None:
        ema_update(state.ema, params, decay=ema_decay)
    return loss.detach()


def _gather_rng(state: TrainState, runtime: Runtime) -> list[dict[str, Tensor]]:
    """Every rank's generator states, on every rank (a collective; only at checkpoints)."""
    gathered: list[Any] = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, state.rng_states())
    return gathered


def run_loop(*, state: TrainState, spec: LoopSpec, loss_fn: LossFn, sample_batch: BatchFn, runtime: Runtime,
             on_checkpoint: CheckpointHook | None = None, on_progress: ProgressCallback | None = None,
             fault_at_step: int | None = None) -> TrainState:
    """Run ``state`` from its step to ``spec.total_steps``.

    Per step: :func:`train_step` with lr = lr_fn(step). The loss is accumulated on the device and
    read every ``log_every`` steps (no host sync per step; data-parallel: averaged over the ranks
    there, the only collective besides DDP's gradient all-reduce); a non-finite loss raises
    :class:`NonFiniteLossError` at that point, on every rank, before any checkpoint of the bad
    weights is written. Logging, ``on_progress`` and ``on_checkpoint`` run on rank 0 only.
    ``fault_at_step`` injects a NaN (tests only).
    """
    model = state.model
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    window_start, window_steps = time.perf_counter(), 0
    for step, x, y in _batches(sample_batch, state.step, spec.total_steps):
        lr = spec.lr_fn(step)
        loss = train_step(state=state, loss_fn=loss_fn, x=x, y=y, lr=lr, runtime=runtime, params=params,
                          grad_clip=spec.grad_clip, ema_decay=spec.ema_decay,
                          poison=fault_at_step is not None and step == fault_at_step)
        loss_sum += loss
        window_steps += 1
        state.step = step + 1
        done = state.step
        at_log = done % spec.log_every == 0 or done == spec.total_steps
        at_ckpt = spec.checkpoint_every > 0 and done % spec.checkpoint_every == 0 and done < spec.total_steps
        if at_log or at_ckpt:
            # the one host sync, every log_every steps (data-parallel: the mean over ranks)
            total = distributed.all_reduce_mean(loss_sum) if runtime.world_size > 1 else loss_sum
            mean_loss = float(total) / window_steps
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"{spec.phase}: loss became {mean_loss} between steps {done - window_steps + 1} and {done}; "
                    f"stopped before saving (the last good checkpoint stays); lower the learning rate or check the data")
            elapsed = time.perf_counter() - window_start
            rate = window_steps / elapsed if elapsed > 0 else float("inf")
            event = ProgressEvent(phase=spec.phase, step=done, total=spec.total_steps, loss=mean_loss, lr=lr,
                                  it_per_s=rate, eta_s=(spec.total_steps - done) / rate if rate > 0 else float("inf"))
            if at_log and runtime.is_main:
                log.info(event.line())
                if on_progress is not None:
                    on_progress(event)
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
            if at_ckpt and on_checkpoint is not None:
                if runtime.world_size > 1:
                    state.rank_rng = _gather_rng(state, runtime)
                if runtime.is_main:
                    on_checkpoint(state)
    return state


def _make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, runtime: Runtime) -> torch.optim.Optimizer:
    kwargs = {"fused": True} if runtime.is_cuda else {}  # one kernel for all parameters instead of a loop
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kwargs)


def _prepare(model: nn.Module, runtime: Runtime) -> nn.Module:
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _maybe_compile(fn: Callable, runtime: Runtime) -> Callable:
    return torch.compile(fn) if runtime.compile else fn


def data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when the runtime spans several processes, else ``model``.

    The wrapper broadcasts rank 0's weights at construction (so build it after any resume) and
    averages gradients over the ranks in ``backward``; optimizer and state dicts stay on ``model``.
    """
    if runtime.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.is_cuda else None
    # the U-Net has no buffers (GroupNorm keeps no running statistics): nothing to sync per forward
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def rank_batches(sample_batch: BatchFn, runtime: Runtime) -> BatchFn:
    """Rank r of W takes batch ``k W + r`` of ``sample_batch``'s stream at step k.

    For a :class:`~pd_core.data.BatchSampler` with batch B, batches kW .. kW + W - 1 are exactly
    batch k of the same sampler with batch W B (rank r holds its rows r B .. (r + 1) B - 1): the
    effective batch is W B and the data order is that of one process (random flips aside, which are
    drawn per batch).
    """
    if runtime.world_size <= 1:
        return sample_batch
    world, rank = runtime.world_size, runtime.rank
    return lambda step: sample_batch(step * world + rank)


class DeviceBatches:
    """A BatchSampler's batches served from a copy of its dataset in device memory.

    ``batches(step)`` equals ``sampler.batch(step)`` moved to ``device``: the indices (and the flips)
    come from the sampler's own stateless functions of (seed, step), travel as one small pinned
    tensor copied asynchronously, and the images are gathered on the device. No host sync.
    """

    def __init__(self, sampler: BatchSampler, device: torch.device):
        self.sampler = sampler
        self.device = device
        self.images = sampler.data.images.to(device)  # (N, C, H, W), once
        self.labels = sampler.data.labels.to(device) if sampler.data.labels is not None else None

    def _flips(self, step: int, count: int) -> Tensor:
        # the same draw as data.BatchSampler.batch (tests/test_ddp.py checks they agree)
        gen = torch.Generator().manual_seed(derive_seed(self.sampler.seed, "flip", step))
        return torch.rand(count, generator=gen) < 0.5  # (B,)

    def __call__(self, step: int) -> tuple[Tensor, Tensor | None]:
        idx = self.sampler.indices(step)  # (B,) int64 on the CPU
        rows = [idx, self._flips(step, len(idx)).long()] if self.sampler.random_flip else [idx]
        host = torch.stack(rows)  # (1 or 2, B)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        images = self.images.index_select(0, dev[0])  # (B, C, H, W)
        if self.sampler.random_flip:
            images = torch.where(dev[1].bool()[:, None, None, None], images.flip(-1), images)
        labels = self.labels.index_select(0, dev[0]) if self.labels is not None else None
        return images, labels


def _fits_on_device(sampler: BatchSampler, runtime: Runtime, *, fraction: float = 0.25) -> bool:
    data = sampler.data
    size = data.images.numel() * data.images.element_size()
    free, _ = torch.cuda.mem_get_info(runtime.device)
    return size <= fraction * free


def _device_batches(sample_batch: BatchFn, runtime: Runtime) -> BatchFn:
    """Batches on the runtime's device: from a device-resident dataset where possible, else copied per batch."""
    owner = getattr(sample_batch, "__self__", None)
    if runtime.is_cuda and isinstance(owner, BatchSampler) and sample_batch.__func__ is BatchSampler.batch \
            and _fits_on_device(owner, runtime):
        fetch_raw: BatchFn = DeviceBatches(owner, runtime.device)
    else:
        fetch_raw = sample_batch

    def fetch(step: int) -> tuple[Tensor, Tensor | None]:
        x, y = fetch_raw(step)
        if x.device != runtime.device:
            x = (x.pin_memory() if runtime.is_cuda else x).to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if y is not None and y.device != runtime.device:
            y = y.to(runtime.device, non_blocking=True)
        return x, y
    return fetch


def _log_batch(phase: str, cfg: Any, runtime: Runtime) -> None:
    """One line: per-process batch x processes = effective batch (what the optimizer averages over)."""
    per_rank = getattr(cfg, "batch_size", None)
    if runtime.is_main and per_rank:
        log.info("%s: effective batch %d = %d per process x %d process(es)%s", phase, per_rank * runtime.world_size,
                 per_rank, runtime.world_size, " (DistributedDataParallel)" if runtime.world_size > 1 else "")


# ----------------------------------------------------------------------------------------------
# Loss functions of the two phases (what one update computes)


def teacher_loss_fn(*, net: nn.Module, diffusion_cfg: Any, generator: torch.Generator) -> LossFn:
    """(x, y) -> per-example diffusion loss of ``net`` (t ~ U[0, 1), noise from ``generator``)."""
    loss = TeacherLoss(weighting=diffusion_cfg.weighting, logsnr_min=diffusion_cfg.logsnr_min,
                       logsnr_max=diffusion_cfg.logsnr_max)

    def loss_fn(x: Tensor, y: Tensor | None) -> Tensor:
        return loss(Denoiser(net, parameterization=diffusion_cfg.parameterization, y=y), x, generator=generator)
    return loss_fn


def distill_loss_fn(*, net: nn.Module, teacher_net: nn.Module, student_steps: int, diffusion_cfg: Any,
                    generator: torch.Generator) -> LossFn:
    """(x, y) -> per-example distillation loss of the student ``net`` against ``teacher_net``'s 2-step DDIM."""
    param = diffusion_cfg.parameterization
    sched = dict(logsnr_min=diffusion_cfg.logsnr_min, logsnr_max=diffusion_cfg.logsnr_max)

    def loss_fn(x: Tensor, y: Tensor | None) -> Tensor:
        teacher = Denoiser(teacher_net, parameterization=param, y=y)
        loss = DistillationLoss(teacher, num_steps=student_steps, weighting=diffusion_cfg.weighting, **sched)
        return loss(Denoiser(net, parameterization=param, y=y), x, generator=generator)
    return loss_fn


# ----------------------------------------------------------------------------------------------
# Teacher training and distillation rounds


@dataclass(frozen=True)
class TrainResult:
    """What a phase hands on: weights (EMA for the teacher), its final loss, steps and wall time."""

    weights: dict[str, Tensor]
    steps: int
    seconds: float
    resumed_from: int  # step the run started at (0 unless resumed)


def _seed_rank_rng(seed: int, runtime: Runtime) -> None:
    """Data-parallel ranks > 0 draw their own dropout masks (rank 0 keeps the single-process stream)."""
    if runtime.rank > 0:
        torch.manual_seed(distributed.rank_seed(seed, runtime.rank))


def new_teacher_state(*, spec: UNetSpec, teacher_cfg: Any, runtime: Runtime, seed: int) -> TrainState:
    """Fresh teacher: seeded init, AdamW, EMA copy of the weights, seeded noise generator (per rank)."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = _prepare(UNet(spec), runtime)
    _seed_rank_rng(seed, runtime)
    opt = _make_optimizer(model, lr=teacher_cfg.lr, weight_decay=teacher_cfg.weight_decay, runtime=runtime)
    ema = [p.detach().clone() for p in model.parameters()] if teacher_cfg.ema_decay else None
    gen = torch.Generator(device=runtime.device).manual_seed(distributed.rank_seed(seed + 1, runtime.rank))
    return TrainState(model=model, optimizer=opt, ema=ema, step=0, noise_generator=gen)


def train_teacher(*, state: TrainState, teacher_cfg: Any, diffusion_cfg: Any, runtime: Runtime,
                  sample_batch: BatchFn, on_checkpoint: CheckpointHook | None = None,
                  on_progress: ProgressCallback | None = None, fault_at_step: int | None = None) -> TrainResult:
    """Train the teacher (continuous t, warmup, grad clip, EMA); returns the EMA weights."""
    start, t0 = state.step, time.perf_counter()
    net = _maybe_compile(data_parallel(state.model, runtime), runtime)
    loss_fn = teacher_loss_fn(net=net, diffusion_cfg=diffusion_cfg, generator=state.noise_generator)
    spec = LoopSpec(phase="teacher", total_steps=teacher_cfg.updates,
                    lr_fn=lambda s: warmup_lr(s, base_lr=teacher_cfg.lr, warmup_steps=teacher_cfg.warmup_steps),
                    grad_clip=teacher_cfg.grad_clip, ema_decay=teacher_cfg.ema_decay,
                    log_every=teacher_cfg.log_every, checkpoint_every=teacher_cfg.checkpoint_every)
    _log_batch(spec.phase, teacher_cfg, runtime)
    run_loop(state=state, spec=spec, loss_fn=loss_fn,
             sample_batch=rank_batches(_device_batches(sample_batch, runtime), runtime),
             runtime=runtime, on_checkpoint=on_checkpoint, on_progress=on_progress, fault_at_step=fault_at_step)
    return TrainResult(weights=state.ema_state_dict(), steps=state.step, seconds=time.perf_counter() - t0,
                       resumed_from=start)


def new_student_state(*, teacher_weights: dict[str, Tensor], spec: UNetSpec, distill_cfg: Any, runtime: Runtime,
                      seed: int) -> TrainState:
    """Student = copy of the teacher's weights (dropout per distill config), fresh AdamW, no EMA by default."""
    student_spec = dataclasses.replace(spec, dropout=distill_cfg.dropout)
    model = UNet(student_spec)
    model.load_state_dict(teacher_weights)
    model = _prepare(model, runtime)
    _seed_rank_rng(seed, runtime)
    opt = _make_optimizer(model, lr=distill_cfg.lr, weight_decay=0.0, runtime=runtime)
    ema_decay = getattr(distill_cfg, "ema_decay", None)
    ema = [p.detach().clone() for p in model.parameters()] if ema_decay else None
    gen = torch.Generator(device=runtime.device).manual_seed(distributed.rank_seed(seed, runtime.rank))
    return TrainState(model=model, optimizer=opt, ema=ema, step=0, noise_generator=gen)


def frozen_teacher(*, weights: dict[str, Tensor], spec: UNetSpec, parameterization: str, runtime: Runtime) -> nn.Module:
    """The teacher network for target computation: eval mode (no dropout), no gradients."""
    net = UNet(dataclasses.replace(spec, dropout=0.0))
    net.load_state_dict(weights)
    net = _prepare(net, runtime).eval().requires_grad_(False)
    return _maybe_compile(net, runtime)


def distill_round(*, state: TrainState, teacher_net: nn.Module, student_steps: int, updates: int, phase: str,
                  distill_cfg: Any, diffusion_cfg: Any, runtime: Runtime, sample_batch: BatchFn,
                  on_checkpoint: CheckpointHook | None = None, on_progress: ProgressCallback | None = None,
                  fault_at_step: int | None = None) -> TrainResult:
    """One round of Algorithm 2: the student (N = student_steps) learns the teacher's 2-step DDIM target.

    lr is annealed linearly from distill.lr to 0 over the round's ``updates``.
    """
    start, t0 = state.step, time.perf_counter()
    net = _maybe_compile(data_parallel(state.model, runtime), runtime)
    loss_fn = distill_loss_fn(net=net, teacher_net=teacher_net, student_steps=student_steps,
                              diffusion_cfg=diffusion_cfg, generator=state.noise_generator)
    spec = LoopSpec(phase=phase, total_steps=updates,
                    lr_fn=lambda s: linear_anneal_lr(s, base_lr=distill_cfg.lr, total_steps=updates),
                    grad_clip=distill_cfg.grad_clip, ema_decay=getattr(distill_cfg, "ema_decay", None),
                    log_every=distill_cfg.log_every, checkpoint_every=distill_cfg.checkpoint_every)
    _log_batch(phase, distill_cfg, runtime)
    run_loop(state=state, spec=spec, loss_fn=loss_fn,
             sample_batch=rank_batches(_device_batches(sample_batch, runtime), runtime),
             runtime=runtime, on_checkpoint=on_checkpoint, on_progress=on_progress, fault_at_step=fault_at_step)
    return TrainResult(weights=state.ema_state_dict(), steps=state.step, seconds=time.perf_counter() - t0,
                       resumed_from=start)


def copy_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies of a state dict (what gets saved)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}


__all__ = [
    "DeviceBatches", "LoopSpec", "NonFiniteLossError", "ProgressEvent", "Runtime", "TrainResult", "TrainState",
    "copy_weights", "data_parallel", "distill_loss_fn", "distill_round", "ema_update", "format_seconds",
    "frozen_teacher", "linear_anneal_lr", "new_student_state", "new_teacher_state", "rank_batches",
    "resolve_runtime", "run_loop", "spec_from_dict", "spec_to_dict", "teacher_loss_fn", "train_step",
    "train_teacher", "unet_spec", "warmup_lr",
]
