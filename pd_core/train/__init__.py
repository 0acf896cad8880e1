"""Training engine: teacher training and distillation rounds, resumable, with progress callbacks.

A round's randomness comes from (seed, step): batches are a stateless function of the step
(``pd_core.data.BatchSampler``); noise and dropout draw from generators whose states are saved
with every in-round checkpoint, so a killed run that resumes ends with exactly the weights of an
uninterrupted one (CPU, fixed ``runtime.threads``). Modules, lowest first: ``progress``,
``schedules``, ``optim_state``, ``threads``, ``runtime``, ``state``, ``loop``, ``batches``,
``phases``. The GPU and CPU fast paths and data parallelism are described in docs/design.md.
"""

from pd_core.train.batches import DeviceBatches, device_batches, rank_batches
from pd_core.train.loop import BatchFn, LoopSpec, LossFn, NonFiniteLossError, data_parallel, run_loop, train_step
from pd_core.train.optim_state import optimizer_state_to_tensors, tensors_to_optimizer_state
from pd_core.train.phases import (
                                  TrainResult,
                                  copy_weights,
                                  distill_loss_fn,
                                  distill_round,
                                  frozen_teacher,
                                  guidance_loss_fn,
                                  guide_distill,
                                  new_guided_student_state,
                                  new_student_state,
                                  new_teacher_state,
                                  teacher_loss_fn,
                                  train_teacher,
)
from pd_core.train.progress import ProgressCallback, ProgressEvent, format_seconds
from pd_core.train.runtime import (
                                  Runtime,
                                  make_optimizer,
                                  maybe_compile,
                                  prepare_module,
                                  resolve_device,
                                  resolve_runtime,
)
from pd_core.train.schedules import ema_update, linear_anneal_lr, warmup_lr
from pd_core.train.state import CheckpointHook, TrainState

__all__ = [
    "BatchFn", "CheckpointHook", "DeviceBatches", "LoopSpec", "LossFn", "NonFiniteLossError", "ProgressCallback",
    "ProgressEvent", "Runtime", "TrainResult", "TrainState", "copy_weights", "data_parallel", "device_batches",
    "distill_loss_fn", "distill_round", "ema_update", "format_seconds", "frozen_teacher", "guidance_loss_fn",
    "guide_distill", "linear_anneal_lr", "make_optimizer", "maybe_compile", "new_guided_student_state",
    "new_student_state", "new_teacher_state", "optimizer_state_to_tensors", "prepare_module", "rank_batches",
    "resolve_device", "resolve_runtime", "run_loop", "teacher_loss_fn", "tensors_to_optimizer_state", "train_step",
    "train_teacher", "warmup_lr",
]
