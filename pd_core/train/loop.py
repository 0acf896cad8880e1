"""The update loop shared by teacher training and distillation: AdamW, clipping, EMA, loss checks, hooks.

The loss is accumulated on the device and read every ``log_every`` updates (no host sync per
update; data-parallel: averaged over the ranks there). Progress and checkpoint hooks run on rank 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pd_core import dist
from pd_core.train.progress import ProgressCallback, ProgressEvent
from pd_core.train.runtime import Runtime
from pd_core.train.schedules import ema_update
from pd_core.train.state import CheckpointHook, TrainState

log = logging.getLogger("pd_core.train")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stops and the last good checkpoint stays."""



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
        group["lr"] = lr * group.get("lr_scale", 1.0)
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


def _gather_rng(state: TrainState) -> list[dict[str, Tensor]]:
    """Every rank's generator states, on every rank (a collective; only at checkpoints)."""
    return dist.all_gather(state.rng_states())


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
        runtime.follow_load()
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
            total = dist.all_reduce_mean(loss_sum) if runtime.world_size > 1 else loss_sum
            mean_loss = float(total) / window_steps
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"{spec.phase}: loss became {mean_loss} between steps {done - window_steps + 1} and {done}; "
                    f"stopped before saving (the last good checkpoint stays); "
                    f"lower the learning rate or check the data")
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
                    state.rank_rng = _gather_rng(state)
                if runtime.is_main:
                    on_checkpoint(state)
    return state



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

