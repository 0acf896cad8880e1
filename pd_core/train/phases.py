"""Teacher training, guided distillation's stage 1 and one distillation round (Algorithm 2), each a loop over the
shared update step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pd_core import dist
from pd_core.architecture import Architecture
from pd_core.config import DiffusionConfig, DistillConfig, GuidanceConfig, TeacherConfig
from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss
from pd_core.guidance import GuidanceLoss, drop_labels, sample_guidance
from pd_core.losses import TeacherLoss
from pd_core.schedule import CosineSchedule, DiscreteSchedule, Schedule
from pd_core.train.batches import device_batches, rank_batches
from pd_core.train.loop import BatchFn, LoopSpec, LossFn, data_parallel, run_loop
from pd_core.train.progress import ProgressCallback
from pd_core.train.runtime import Runtime, make_optimizer, maybe_compile, prepare_module
from pd_core.train.schedules import linear_anneal_lr, warmup_lr
from pd_core.train.state import CheckpointHook, TrainState
from pd_core.unet import UNet, UNetSpec

log = logging.getLogger("pd_core.train")
# the guidance embedding's parameters: the project's U-Net's MLP, a text UNet's W of phi_d(w)
GUIDANCE_EMBEDDINGS = ("guide_mlp", "unet.time_embedding.cond_proj")


def _log_batch(phase: str, *, per_rank: int, runtime: Runtime) -> None:
    """One line: per-process batch x processes = effective batch (what the optimizer averages over)."""
    if runtime.is_main:
        log.info("%s: effective batch %d = %d per process x %d process(es)%s%s", phase,
                 per_rank * runtime.world_size, per_rank, runtime.world_size,
                 f" on {runtime.nodes} nodes" if runtime.nodes > 1 else "",
                 " (DistributedDataParallel)" if runtime.world_size > 1 else "")


def teacher_loss_fn(*, net: nn.Module, diffusion_cfg: DiffusionConfig, generator: torch.Generator,
                    label_dropout: float = 0.0, null_label: int | None = None) -> LossFn:
    """(x, y) -> per-example diffusion loss of ``net`` (t ~ U[0, 1), noise from ``generator``).

    With ``label_dropout`` p > 0, each label is first replaced by ``null_label`` with probability p
    (drawn from ``generator`` before t and the noise).
    """
    schedule = CosineSchedule(logsnr_min=diffusion_cfg.logsnr_min, logsnr_max=diffusion_cfg.logsnr_max)
    loss = TeacherLoss(weighting=diffusion_cfg.weighting, schedule=schedule)
    if label_dropout > 0 and null_label is None:
        raise ValueError("label dropout needs the null label of a class-conditional net")

    def loss_fn(x: Tensor, y: Tensor | None) -> Tensor:
        if label_dropout > 0 and y is not None:
            y = drop_labels(y, p=label_dropout, null_label=null_label, generator=generator)
        return loss(Denoiser(net, parameterization=diffusion_cfg.parameterization, y=y), x, generator=generator)
    return loss_fn


def distill_loss_fn(*, net: nn.Module, teacher_net: nn.Module, student_steps: int, diffusion_cfg: DiffusionConfig,
                    schedule: Schedule, generator: torch.Generator, teacher_parameterization: str | None = None,
                    student_parameterization: str | None = None,
                    guidance_range: tuple[float, float] | None = None) -> LossFn:
    """(x, y) -> per-example distillation loss of the student ``net`` against ``teacher_net``'s 2-step DDIM.

    ``schedule`` is the teacher's (a round never changes it). Teacher and student read their
    outputs with their own parameterizations (default: diffusion.parameterization); the loss
    weighting is diffusion.weighting over the student's x-error. With ``guidance_range`` (w_min, w_max)
    (stage 2 of guided distillation), w ~ U[w_min, w_max] is drawn per example from ``generator``
    first and bound, with the label, to teacher and student alike.
    """
    teacher_kind = teacher_parameterization or diffusion_cfg.parameterization
    student_kind = student_parameterization or diffusion_cfg.parameterization

    def loss_fn(x: Tensor, y: Tensor | None) -> Tensor:
        w = None
        if guidance_range is not None:
            w = sample_guidance(x.shape[0], w_min=guidance_range[0], w_max=guidance_range[1], generator=generator,
                                device=x.device, dtype=x.dtype)
        teacher = Denoiser(teacher_net, parameterization=teacher_kind, y=y, w=w)
        loss = DistillationLoss(teacher, num_steps=student_steps, weighting=diffusion_cfg.weighting,
                                schedule=schedule)
        return loss(Denoiser(net, parameterization=student_kind, y=y, w=w), x, generator=generator)
    return loss_fn


def guidance_loss_fn(*, net: nn.Module, teacher_net: nn.Module, null_label: int, guidance_cfg: GuidanceConfig,
                     diffusion_cfg: DiffusionConfig, schedule: Schedule, generator: torch.Generator,
                     teacher_parameterization: str | None = None,
                     student_parameterization: str | None = None) -> LossFn:
    """(x, y) -> per-example stage-1 loss of the w-conditioned student ``net`` against the guided ``teacher_net``.

    Teacher and student read their outputs with their own parameterizations (default: diffusion.parameterization).
    """
    teacher_kind = teacher_parameterization or diffusion_cfg.parameterization
    student_kind = student_parameterization or diffusion_cfg.parameterization
    t_min = 1.0 / schedule.num_timesteps if isinstance(schedule, DiscreteSchedule) else 0.0  # its first timestep
    loss = GuidanceLoss(Denoiser(teacher_net, parameterization=teacher_kind), null_label=null_label,
                        w_min=guidance_cfg.w_min, w_max=guidance_cfg.w_max, weighting=diffusion_cfg.weighting,
                        schedule=schedule, t_min=t_min)

    def loss_fn(x: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("guided distillation needs class labels in every batch (a labelled dataset)")
        return loss(Denoiser(net, parameterization=student_kind), x, y, generator=generator)
    return loss_fn


@dataclass(frozen=True)
class TrainResult:
    """What a phase hands on: weights (EMA for the teacher), steps, wall time and where it resumed."""

    weights: dict[str, Tensor]
    steps: int
    seconds: float
    resumed_from: int  # step the run started at (0 unless resumed)


def _seed_rank_rng(seed: int, runtime: Runtime) -> None:
    """Data-parallel ranks > 0 draw their own dropout masks (rank 0 keeps the single-process stream)."""
    if runtime.rank > 0:
        torch.manual_seed(dist.rank_seed(seed, runtime.rank))


def _train(*, state: TrainState, spec: LoopSpec, loss_fn: LossFn, batch_size: int, runtime: Runtime,
           sample_batch: BatchFn, on_checkpoint: CheckpointHook | None, on_progress: ProgressCallback | None,
           fault_at_step: int | None) -> TrainResult:
    """Run the loop from ``state.step`` to ``spec.total_steps``; the weights handed on are the EMA's, if any."""
    start, t0 = state.step, time.perf_counter()
    _log_batch(spec.phase, per_rank=batch_size // runtime.nodes, runtime=runtime)
    run_loop(state=state, spec=spec, loss_fn=loss_fn,
             sample_batch=rank_batches(device_batches(sample_batch, runtime), runtime),
             runtime=runtime, on_checkpoint=on_checkpoint, on_progress=on_progress, fault_at_step=fault_at_step)
    return TrainResult(weights=state.ema_state_dict(), steps=state.step, seconds=time.perf_counter() - t0,
                       resumed_from=start)


def new_teacher_state(*, spec: UNetSpec, teacher_cfg: TeacherConfig, runtime: Runtime, seed: int) -> TrainState:
    """Fresh teacher: seeded init, AdamW, EMA copy of the weights, seeded noise generator (per rank)."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = prepare_module(UNet(spec), runtime)
    _seed_rank_rng(seed, runtime)
    opt = make_optimizer(model, lr=teacher_cfg.lr, weight_decay=teacher_cfg.weight_decay, runtime=runtime)
    ema = [p.detach().clone() for p in model.parameters()] if teacher_cfg.ema_decay else None
    gen = torch.Generator(device=runtime.device).manual_seed(dist.rank_seed(seed + 1, runtime.rank))
    return TrainState(model=model, optimizer=opt, ema=ema, step=0, noise_generator=gen)


def train_teacher(*, state: TrainState, teacher_cfg: TeacherConfig, diffusion_cfg: DiffusionConfig,
                  runtime: Runtime, sample_batch: BatchFn, on_checkpoint: CheckpointHook | None = None,
                  on_progress: ProgressCallback | None = None, fault_at_step: int | None = None,
                  null_label: int | None = None) -> TrainResult:
    """Train the teacher (continuous t, warmup, grad clip, EMA); returns the EMA weights.

    teacher.label_dropout > 0 replaces labels by ``null_label`` (the net's null class) at that rate.
    """
    net = maybe_compile(data_parallel(state.model, runtime), runtime)
    loss_fn = teacher_loss_fn(net=net, diffusion_cfg=diffusion_cfg, generator=state.noise_generator,
                              label_dropout=teacher_cfg.label_dropout, null_label=null_label)
    spec = LoopSpec(phase="teacher", total_steps=teacher_cfg.updates,
                    lr_fn=lambda s: warmup_lr(s, base_lr=teacher_cfg.lr, warmup_steps=teacher_cfg.warmup_steps),
                    grad_clip=teacher_cfg.grad_clip, ema_decay=teacher_cfg.ema_decay,
                    log_every=teacher_cfg.log_every, checkpoint_every=teacher_cfg.checkpoint_every)
    return _train(state=state, spec=spec, loss_fn=loss_fn, batch_size=teacher_cfg.batch_size, runtime=runtime,
                  sample_batch=sample_batch, on_checkpoint=on_checkpoint, on_progress=on_progress,
                  fault_at_step=fault_at_step)


def new_student_state(*, teacher_weights: dict[str, Tensor], arch: Architecture, distill_cfg: DistillConfig,
                      runtime: Runtime, seed: int) -> TrainState:
    """Student = copy of the teacher (same architecture and weights, dropout per distill config), fresh AdamW,
    no EMA (paper)."""
    model = arch.build(dropout=distill_cfg.dropout)
    model.load_state_dict(teacher_weights)
    model = prepare_module(model, runtime)
    _seed_rank_rng(seed, runtime)
    opt = make_optimizer(model, lr=distill_cfg.lr, weight_decay=0.0, runtime=runtime)
    gen = torch.Generator(device=runtime.device).manual_seed(dist.rank_seed(seed, runtime.rank))
    return TrainState(model=model, optimizer=opt, ema=None, step=0, noise_generator=gen)


def new_guided_student_state(*, teacher_weights: dict[str, Tensor], arch: Architecture, distill_cfg: DistillConfig,
                             guidance_cfg: GuidanceConfig, runtime: Runtime, seed: int) -> TrainState:
    """Stage-1 student: the teacher's net plus a guidance embedding whose last layer is zero (so it starts as the
    teacher's conditional model); dropout per distill config, fresh AdamW (the embedding's lr times
    guidance.embedding_lr_scale: from zero it must learn within stage 1's updates), no EMA. ``arch`` is the student's
    (its teacher's architecture with ``guidance_embedding``)."""
    torch.manual_seed(seed)  # the guidance embedding's first layer: the same init on every rank
    model = arch.build(dropout=distill_cfg.dropout)
    fresh = model.state_dict()
    unknown = sorted(set(teacher_weights) - set(fresh))
    if unknown or not arch.guidance_embedding:
        raise ValueError(f"the stage-1 student must be the teacher's net plus a guidance embedding; "
                         f"{unknown[0] if unknown else 'arch.guidance_embedding'} does not fit")
    model.load_state_dict({**fresh, **teacher_weights})
    model = prepare_module(model, runtime)
    _seed_rank_rng(seed, runtime)
    opt = make_optimizer(model, lr=guidance_cfg.lr, weight_decay=0.0, runtime=runtime,
                         lr_scales={name: guidance_cfg.embedding_lr_scale for name in GUIDANCE_EMBEDDINGS})
    gen = torch.Generator(device=runtime.device).manual_seed(dist.rank_seed(seed, runtime.rank))
    return TrainState(model=model, optimizer=opt, ema=None, step=0, noise_generator=gen)


def guide_distill(*, state: TrainState, teacher_net: nn.Module, null_label: int, guidance_cfg: GuidanceConfig,
                  diffusion_cfg: DiffusionConfig, schedule: Schedule, runtime: Runtime, sample_batch: BatchFn,
                  teacher_parameterization: str | None = None, student_parameterization: str | None = None,
                  on_checkpoint: CheckpointHook | None = None, on_progress: ProgressCallback | None = None,
                  fault_at_step: int | None = None) -> TrainResult:
    """Stage 1 of guided distillation: the w-conditioned student learns the guided teacher (pd_core.guidance).

    lr is annealed linearly from guidance.lr to 0 over guidance.updates.
    """
    net = maybe_compile(data_parallel(state.model, runtime), runtime)
    loss_fn = guidance_loss_fn(net=net, teacher_net=teacher_net, null_label=null_label, guidance_cfg=guidance_cfg,
                               diffusion_cfg=diffusion_cfg, schedule=schedule, generator=state.noise_generator,
                               teacher_parameterization=teacher_parameterization,
                               student_parameterization=student_parameterization)
    updates = guidance_cfg.updates
    spec = LoopSpec(phase="guide-distill", total_steps=updates,
                    lr_fn=lambda s: linear_anneal_lr(s, base_lr=guidance_cfg.lr, total_steps=updates),
                    grad_clip=guidance_cfg.grad_clip, ema_decay=None,
                    log_every=guidance_cfg.log_every, checkpoint_every=guidance_cfg.checkpoint_every)
    return _train(state=state, spec=spec, loss_fn=loss_fn, batch_size=guidance_cfg.batch_size, runtime=runtime,
                  sample_batch=sample_batch, on_checkpoint=on_checkpoint, on_progress=on_progress,
                  fault_at_step=fault_at_step)


def frozen_teacher(*, weights: dict[str, Tensor], arch: Architecture, runtime: Runtime) -> nn.Module:
    """The teacher network for target computation: eval mode (no dropout), no gradients."""
    net = arch.build(dropout=0.0)
    net.load_state_dict(weights)
    net = prepare_module(net, runtime).eval().requires_grad_(False)
    return maybe_compile(net, runtime)


def distill_round(*, state: TrainState, teacher_net: nn.Module, student_steps: int, updates: int, phase: str,
                  distill_cfg: DistillConfig, diffusion_cfg: DiffusionConfig, schedule: Schedule, runtime: Runtime,
                  sample_batch: BatchFn, teacher_parameterization: str, student_parameterization: str,
                  on_checkpoint: CheckpointHook | None = None, on_progress: ProgressCallback | None = None,
                  fault_at_step: int | None = None, guidance_range: tuple[float, float] | None = None) -> TrainResult:
    """One round of Algorithm 2: the student (N = student_steps) learns the teacher's 2-step DDIM target.

    lr is annealed linearly from distill.lr to 0 over the round's ``updates``. ``guidance_range``:
    a round of guided distillation's stage 2 (see :func:`distill_loss_fn`).
    """
    net = maybe_compile(data_parallel(state.model, runtime), runtime)
    loss_fn = distill_loss_fn(net=net, teacher_net=teacher_net, student_steps=student_steps,
                              diffusion_cfg=diffusion_cfg, schedule=schedule, generator=state.noise_generator,
                              teacher_parameterization=teacher_parameterization,
                              student_parameterization=student_parameterization, guidance_range=guidance_range)
    spec = LoopSpec(phase=phase, total_steps=updates,
                    lr_fn=lambda s: linear_anneal_lr(s, base_lr=distill_cfg.lr, total_steps=updates),
                    grad_clip=distill_cfg.grad_clip, ema_decay=None,
                    log_every=distill_cfg.log_every, checkpoint_every=distill_cfg.checkpoint_every)
    return _train(state=state, spec=spec, loss_fn=loss_fn, batch_size=distill_cfg.batch_size, runtime=runtime,
                  sample_batch=sample_batch, on_checkpoint=on_checkpoint, on_progress=on_progress,
                  fault_at_step=fault_at_step)


def copy_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies of a state dict (what gets saved)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
