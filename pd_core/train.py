"""Training engine: teacher training and distillation rounds, resumable, with progress callbacks.

Pure PyTorch; the Prefect task and the CLI drive these functions. A round's randomness comes from
(seed, step): batches are a stateless function of the step (``data.BatchSampler``), noise and
dropout draw from generators whose states are saved with every in-round checkpoint, so a killed
run that resumes ends with exactly the weights of an uninterrupted one (CPU).
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

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(runtime_cfg: Any) -> Runtime:
    """Runtime from a RuntimeConfig: bf16 autocast and channels_last only where a GPU is present."""
    want = getattr(runtime_cfg, "device", "auto")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no CUDA device is available; use runtime.device=auto or cpu")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    precision = getattr(runtime_cfg, "precision", "auto")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast_dtype = dtypes[precision]
    channels_last = getattr(runtime_cfg, "channels_last", None)
    if channels_last is None:
        channels_last = device.type == "cuda"
    threads = getattr(runtime_cfg, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    return Runtime(device=device, autocast_dtype=autocast_dtype, channels_last=bool(channels_last),
                   compile=bool(getattr(runtime_cfg, "compile", False)))


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
        tensors["rng.noise"] = self.noise_generator.get_state().cpu()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        return tensors, {"step": self.step, "optimizer": opt_meta, "has_ema": self.ema is not None}

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
        self.noise_generator.set_state(tensors["rng.noise"].to(self.noise_generator.get_state().device))
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step = int(meta["step"])


# ----------------------------------------------------------------------------------------------
# The loop shared by teacher training and distillation


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


def _batches(sample_batch: Callable[[int], tuple[Tensor, Tensor | None]], start: int, stop: int) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    for step in range(start, stop):
        x, y = sample_batch(step)
        yield step, x, y


def run_loop(*, state: TrainState, spec: LoopSpec, loss_fn: Callable[[Tensor, Tensor | None], Tensor],
             sample_batch: Callable[[int], tuple[Tensor, Tensor | None]], runtime: Runtime,
             on_checkpoint: CheckpointHook | None = None, on_progress: ProgressCallback | None = None,
             fault_at_step: int | None = None) -> TrainState:
    """Run ``state`` from its step to ``spec.total_steps``.

    Per step: lr <- lr_fn(step); loss = mean(loss_fn(x, y)); backward; clip; optimizer step; EMA.
    The loss is accumulated on the device and read every ``log_every`` steps (no host sync per
    step); a non-finite loss raises :class:`NonFiniteLossError` at that point, before any
    checkpoint of the bad weights is written. ``fault_at_step`` injects a NaN (tests only).
    """
    model, opt = state.model, state.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    window_start, window_steps = time.perf_counter(), 0
    for step, x, y in _batches(sample_batch, state.step, spec.total_steps):
        lr = spec.lr_fn(step)
        for group in opt.param_groups:
            group["lr"] = lr
        with runtime.autocast():
            loss = loss_fn(x, y).mean()
        if fault_at_step is not None and step == fault_at_step:
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        if state.ema is not None and spec.ema_decay is not None:
            ema_update(state.ema, params, decay=spec.ema_decay)
        loss_sum += loss.detach()
        window_steps += 1
        state.step = step + 1
        done = state.step
        at_log = done % spec.log_every == 0 or done == spec.total_steps
        at_ckpt = spec.checkpoint_every > 0 and done % spec.checkpoint_every == 0 and done < spec.total_steps
        if at_log or at_ckpt:
            mean_loss = float(loss_sum) / window_steps  # the one host sync, every log_every steps
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"{spec.phase}: loss became {mean_loss} between steps {done - window_steps + 1} and {done}; "
                    f"stopped before saving (the last good checkpoint stays); lower the learning rate or check the data")
            elapsed = time.perf_counter() - window_start
            rate = window_steps / elapsed if elapsed > 0 else float("inf")
            event = ProgressEvent(phase=spec.phase, step=done, total=spec.total_steps, loss=mean_loss, lr=lr,
                                  it_per_s=rate, eta_s=(spec.total_steps - done) / rate if rate > 0 else float("inf"))
            if at_log:
                log.info(event.line())
                if on_progress is not None:
                    on_progress(event)
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
            if at_ckpt and on_checkpoint is not None:
                on_checkpoint(state)
    return state


def _make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, runtime: Runtime) -> torch.optim.Optimizer:
    kwargs = {"fused": True} if runtime.is_cuda else {}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kwargs)


def _prepare(model: nn.Module, runtime: Runtime) -> nn.Module:
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _maybe_compile(fn: Callable, runtime: Runtime) -> Callable:
    return torch.compile(fn) if runtime.compile else fn


def _device_batches(sample_batch: Callable[[int], tuple[Tensor, Tensor | None]], runtime: Runtime):
    def fetch(step: int) -> tuple[Tensor, Tensor | None]:
        x, y = sample_batch(step)
        x = x.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, (y.to(runtime.device, non_blocking=True) if y is not None else None)
    return fetch


# ----------------------------------------------------------------------------------------------
# Teacher training and distillation rounds


@dataclass(frozen=True)
class TrainResult:
    """What a phase hands on: weights (EMA for the teacher), its final loss, steps and wall time."""

    weights: dict[str, Tensor]
    steps: int
    seconds: float
    resumed_from: int  # step the run started at (0 unless resumed)


def new_teacher_state(*, spec: UNetSpec, teacher_cfg: Any, runtime: Runtime, seed: int) -> TrainState:
    """Fresh teacher: seeded init, AdamW, EMA copy of the weights, seeded noise generator."""
    torch.manual_seed(seed)
    model = _prepare(UNet(spec), runtime)
    opt = _make_optimizer(model, lr=teacher_cfg.lr, weight_decay=teacher_cfg.weight_decay, runtime=runtime)
    ema = [p.detach().clone() for p in model.parameters()] if teacher_cfg.ema_decay else None
    gen = torch.Generator(device=runtime.device).manual_seed(seed + 1)
    return TrainState(model=model, optimizer=opt, ema=ema, step=0, noise_generator=gen)


def train_teacher(*, state: TrainState, teacher_cfg: Any, diffusion_cfg: Any, runtime: Runtime,
                  sample_batch: Callable[[int], tuple[Tensor, Tensor | None]],
                  on_checkpoint: CheckpointHook | None = None, on_progress: ProgressCallback | None = None,
                  fault_at_step: int | None = None) -> TrainResult:
    """Train the teacher (continuous t, warmup, grad clip, EMA); returns the EMA weights."""
    start, t0 = state.step, time.perf_counter()
    loss = TeacherLoss(weighting=diffusion_cfg.weighting, logsnr_min=diffusion_cfg.logsnr_min,
                       logsnr_max=diffusion_cfg.logsnr_max)
    net = _maybe_compile(state.model, runtime)

    def loss_fn(x: Tensor, y: Tensor | None) -> Tensor:
        model = Denoiser(net, parameterization=diffusion_cfg.parameterization, y=y)
        return loss(model, x, generator=state.noise_generator)

    spec = LoopSpec(phase="teacher", total_steps=teacher_cfg.updates,
                    lr_fn=lambda s: warmup_lr(s, base_lr=teacher_cfg.lr, warmup_steps=teacher_cfg.warmup_steps),
                    grad_clip=teacher_cfg.grad_clip, ema_decay=teacher_cfg.ema_decay,
                    log_every=teacher_cfg.log_every, checkpoint_every=teacher_cfg.checkpoint_every)
    run_loop(state=state, spec=spec, loss_fn=loss_fn, sample_batch=_device_batches(sample_batch, runtime),
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
    opt = _make_optimizer(model, lr=distill_cfg.lr, weight_decay=0.0, runtime=runtime)
    ema_decay = getattr(distill_cfg, "ema_decay", None)
    ema = [p.detach().clone() for p in model.parameters()] if ema_decay else None
    gen = torch.Generator(device=runtime.device).manual_seed(seed)
    return TrainState(model=model, optimizer=opt, ema=ema, step=0, noise_generator=gen)


def frozen_teacher(*, weights: dict[str, Tensor], spec: UNetSpec, parameterization: str, runtime: Runtime) -> nn.Module:
    """The teacher network for target computation: eval mode (no dropout), no gradients."""
    net = UNet(dataclasses.replace(spec, dropout=0.0))
    net.load_state_dict(weights)
    net = _prepare(net, runtime).eval().requires_grad_(False)
    return _maybe_compile(net, runtime)


def distill_round(*, state: TrainState, teacher_net: nn.Module, student_steps: int, updates: int, phase: str,
                  distill_cfg: Any, diffusion_cfg: Any, runtime: Runtime,
                  sample_batch: Callable[[int], tuple[Tensor, Tensor | None]],
                  on_checkpoint: CheckpointHook | None = None, on_progress: ProgressCallback | None = None,
                  fault_at_step: int | None = None) -> TrainResult:
    """One round of Algorithm 2: the student (N = student_steps) learns the teacher's 2-step DDIM target.

    lr is annealed linearly from distill.lr to 0 over the round's ``updates``.
    """
    start, t0 = state.step, time.perf_counter()
    net = _maybe_compile(state.model, runtime)
    param = diffusion_cfg.parameterization
    sched = dict(logsnr_min=diffusion_cfg.logsnr_min, logsnr_max=diffusion_cfg.logsnr_max)

    def loss_fn(x: Tensor, y: Tensor | None) -> Tensor:
        teacher = Denoiser(teacher_net, parameterization=param, y=y)
        loss = DistillationLoss(teacher, num_steps=student_steps, weighting=diffusion_cfg.weighting, **sched)
        return loss(Denoiser(net, parameterization=param, y=y), x, generator=state.noise_generator)

    spec = LoopSpec(phase=phase, total_steps=updates,
                    lr_fn=lambda s: linear_anneal_lr(s, base_lr=distill_cfg.lr, total_steps=updates),
                    grad_clip=distill_cfg.grad_clip, ema_decay=getattr(distill_cfg, "ema_decay", None),
                    log_every=distill_cfg.log_every, checkpoint_every=distill_cfg.checkpoint_every)
    run_loop(state=state, spec=spec, loss_fn=loss_fn, sample_batch=_device_batches(sample_batch, runtime),
             runtime=runtime, on_checkpoint=on_checkpoint, on_progress=on_progress, fault_at_step=fault_at_step)
    return TrainResult(weights=state.ema_state_dict(), steps=state.step, seconds=time.perf_counter() - t0,
                       resumed_from=start)


def copy_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies of a state dict (what gets saved)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}


__all__ = [
    "NonFiniteLossError", "ProgressEvent", "Runtime", "TrainResult", "TrainState", "copy_weights", "distill_round",
    "ema_update", "format_seconds", "frozen_teacher", "linear_anneal_lr", "new_student_state", "new_teacher_state",
    "resolve_runtime", "run_loop", "spec_from_dict", "spec_to_dict", "train_teacher", "unet_spec", "warmup_lr",
]
