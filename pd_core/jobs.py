"""The units of work of a pipeline, over the checkpoint store: ensure the teacher, guided distillation's
stage 1 (when guidance.enabled), run one round.

Each job is idempotent and resumable. A complete, verified checkpoint at its key is reused
(skipped) only when its lineage (:mod:`pd_core.lineage`: the hash of the settings that decide its
weights, and its parent's sha256) is what this run would produce; otherwise the job refuses with
one line saying how to go on (``--restart-from N`` or ``--name``). ``pipeline.restart_from = N``
retrains round N and every later round (N = 0: the teacher too) and keeps what comes before N as it
is. An in-round state next to the key means "continue from there" when it carries the same lineage
and is discarded (one log line) when it does not. A corrupt checkpoint is retrained, saying so. A
student is complete only after its samples are finite (:mod:`pd_core.finite`). What every job does
with its checkpoint (keys, manifest, reuse, resume, publish) is :mod:`pd_core.job_checkpoints`.

In a data-parallel job every rank calls the same job; rank 0 alone writes, at the call sites marked
``dist.run_on_main`` and ``runtime.is_main``. Prefect tasks, the torchrun child and the CLI call
these; nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from pd_core import dist, finite, lineage, text_to_image
from pd_core.architecture import Architecture, DiffusersUNet2D, PdUNet, architecture_from_manifest
from pd_core.config import Config
from pd_core.data import BatchSampler, ImageData, load_split
from pd_core.interop.diffusers import read_diffusers_model, weights_sha256
from pd_core.interop.diffusers_folder import check_timesteps, is_diffusers_uri
from pd_core.interop.sd_unet import CaptionTableArch
from pd_core.job_checkpoints import (
    CheckpointInfo,
    _manifest,
    _publish,
    _resume,
    _reusable,
    _state_saver,
    _timing,
    guided_key,
    open_store,
    pipeline_prefix,
    round_key,
    round_phase,
    state_key,
    teacher_key,
)
from pd_core.kinds import student_parameterization
from pd_core.lineage import PipelineMismatchError
from pd_core.models import check_weights_fit, manifest_schedule, model_from_tensors, split_uri
from pd_core.schedule import CosineSchedule, Schedule
from pd_core.store import NOT_SAVED, CheckpointStore, StoreError
from pd_core.train import (
    ProgressCallback,
    ProgressEvent,
    distill_round,
    frozen_teacher,
    guide_distill,
    new_guided_student_state,
    new_student_state,
    new_teacher_state,
    resolve_runtime,
    train_teacher,
)
from pd_core.unet import UNetSpec, unet_spec

log = logging.getLogger(__name__)

HUGE_TEACHER_LOSS = 1e6  # a teacher ending above this final loss almost surely diverged: warned about


def _model_spec(cfg: Config, data: ImageData) -> UNetSpec:
    return unet_spec(cfg, in_channels=data.images.shape[1], num_classes=data.num_classes)


def _config_schedule(cfg: Config) -> Schedule:
    """The schedule of a teacher trained here: the cosine over diffusion.logsnr_min .. logsnr_max."""
    return CosineSchedule(logsnr_min=cfg.diffusion.logsnr_min, logsnr_max=cfg.diffusion.logsnr_max)


def _check_finite_student(weights: dict[str, torch.Tensor], manifest: dict, *, label: str, round_index: int,
                          device: torch.device, w: float = 0.0, section: str = "distill",
                          arch: Architecture | None = None) -> None:
    """NonFiniteOutputError (naming the round and the way out) unless the student's weights and samples are finite.

    A class-conditional student samples at guidance weight ``w``; ``section`` is the config section
    whose lr and grad_clip trained it (``guidance`` for stage 1).
    """
    steps = int(manifest["steps"])
    bad, total = finite.nonfinite_weights(weights), sum(t.numel() for t in weights.values())
    what = f"{bad} of its {total} weights are non-finite"
    if not bad:
        model = model_from_tensors(weights, manifest, source=label, device=device, arch=arch)
        bad, total = finite.nonfinite_samples(model, steps=steps, device=device, w=w)
        what = (f"the student samples non-finite values ({bad} of {total} values, {finite.CHECK_SAMPLES} "
                f"samples at {steps} step(s), seed {finite.CHECK_SEED}{f', w {w:g}' if model.num_classes else ''})")
    if bad:
        raise finite.NonFiniteOutputError(
            f"{label}: {what}; nothing was saved as complete. Lower {section}.lr (or set {section}.grad_clip) and "
            f"rerun with --restart-from {round_index}: it retrains this round, the rounds before it are kept")


def load_train_data(cfg: Config, store: CheckpointStore | None = None) -> ImageData:
    """The training split of ``cfg.data``; a text-to-image pipeline's: its encoded latents from ``store``."""
    if text_to_image.is_text_pipeline(cfg):
        return text_to_image.encoded_train_data(cfg, store if store is not None else open_store(cfg))
    return load_split(cfg.data, split="train")


def sampler_for(cfg: Config, data: ImageData, *, seed: int) -> BatchSampler:
    """A round's batch sampler (distill.batch_size per process)."""
    return BatchSampler(data, batch_size=cfg.distill.batch_size, seed=seed, random_flip=cfg.data.random_flip)


def _teacher_source(cfg: Config, store: CheckpointStore) -> tuple[str | None, bool]:
    """(the teacher's source sha256, whether ``pipeline.teacher_uri`` names this pipeline's own teacher).

    No teacher_uri: (None, False), the teacher is trained here. A teacher_uri naming another checkpoint:
    its sha256 (from its manifest), the parent an import records; a diffusers folder: its weights file's.
    One naming this pipeline's own teacher (what the ``pd-distill`` deployment passes after
    ``train-teacher``): that teacher's own parent, so it is reused as it is, never imported onto itself.
    """
    uri = cfg.pipeline.teacher_uri
    if not uri:
        return None, False
    if is_diffusers_uri(uri) and text_to_image.is_text_pipeline(cfg):  # every file a load of the pipeline reads
        return text_to_image.text_source_sha256(cfg), False
    if is_diffusers_uri(uri):  # a diffusers folder: the sha256 of its weights file
        return weights_sha256(uri, storage_options=dict(cfg.storage.storage_options)), False
    src_root, src_key = split_uri(uri)
    src = CheckpointStore(src_root, storage_options=dict(cfg.storage.storage_options))
    manifest = src.read_manifest(src_key)
    if manifest is None or not isinstance(manifest.get("sha256"), str):
        raise StoreError(f"pipeline.teacher_uri {uri}: no checkpoint there (no manifest.json); point it at a "
                         f"checkpoint folder as `pd run` prints it")
    if src.uri(src_key) == store.uri(teacher_key(cfg.pipeline.name)):
        return manifest.get("parent_sha256"), True
    return manifest["sha256"], False


def _final_loss_watch(on_progress: ProgressCallback | None) -> tuple[ProgressCallback, list[float]]:
    """A progress callback that passes events on and records each reported loss (the last one is the final)."""
    losses: list[float] = []

    def watch(event: ProgressEvent) -> None:
        losses.append(float(event.loss))
        if on_progress is not None:
            on_progress(event)
    return watch, losses


def ensure_teacher(cfg: Config, store: CheckpointStore, *, data: ImageData | None = None,
                   on_progress: ProgressCallback | None = None, fault_at_step: int | None = None) -> CheckpointInfo:
    """The pipeline's teacher checkpoint: reused (same lineage), imported (pipeline.teacher_uri), or trained."""
    key = teacher_key(cfg.pipeline.name)
    start = cfg.distill.start_steps
    if is_diffusers_uri(cfg.pipeline.teacher_uri) and store.problem(key) == NOT_SAVED:
        return import_teacher(cfg, store, uri=cfg.pipeline.teacher_uri)  # nothing to compare: one read of the folder
    source_sha256, own = _teacher_source(cfg, store)
    want = lineage.teacher_lineage(cfg, source_sha256=source_sha256)
    found = _reusable(store, cfg, key, want=want, label="teacher", steps=start, round_index=0)
    if found is not None:
        return found
    if cfg.pipeline.teacher_uri and not own:
        return import_teacher(cfg, store, uri=cfg.pipeline.teacher_uri)
    if own and source_sha256 is not None:
        raise StoreError(f"pipeline.teacher_uri names this pipeline's own teacher ({store.uri(key)}), an import that "
                         f"cannot be reused; point pipeline.teacher_uri at the checkpoint it was imported from")
    data = data if data is not None else load_train_data(cfg)
    runtime = resolve_runtime(cfg.runtime)
    spec = _model_spec(cfg, data)
    seed = cfg.pipeline.seed
    state = new_teacher_state(spec=spec, teacher_cfg=cfg.teacher, runtime=runtime, seed=seed)
    _resume(store, key, state, want=want, label="teacher", is_main=runtime.is_main)
    batches = BatchSampler(data, batch_size=cfg.teacher.batch_size, seed=seed, random_flip=cfg.data.random_flip)
    progress, losses = _final_loss_watch(on_progress)
    result = train_teacher(state=state, teacher_cfg=cfg.teacher, diffusion_cfg=cfg.diffusion, runtime=runtime,
                           sample_batch=batches.batch, on_checkpoint=_state_saver(store, key, want),
                           on_progress=progress, fault_at_step=fault_at_step,
                           null_label=spec.num_classes if spec.null_class else None)
    bad = finite.nonfinite_weights(result.weights)
    if bad:
        raise finite.NonFiniteOutputError(f"teacher: {bad} of its weights are non-finite after training; nothing was "
                                          f"saved as complete. Lower teacher.lr (or set teacher.grad_clip) and rerun")
    if losses and losses[-1] > HUGE_TEACHER_LOSS:
        log.warning("teacher: final loss %.3g is huge (> %.0e): it probably diverged; its students will be no better. "
                    "Lower teacher.lr or check the data, then rerun with --restart-from 0", losses[-1],
                    HUGE_TEACHER_LOSS)
    manifest = _manifest(cfg, kind="teacher", spec=spec, steps=start, round_index=0, lineage_=want,
                         schedule=_config_schedule(cfg), extra={"updates": result.steps, **_timing(result)})
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("teacher saved to %s (sha256 %s)", info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


def shared_teacher(cfg: Config, store: CheckpointStore, *, key: str) -> CheckpointInfo:
    """Another pipeline's teacher at ``key`` in the same store, used where it is (no copy): a sweep's points that
    share everything that decides the teacher share one.

    It must be complete and verified, and its lineage exactly the teacher this pipeline would train here
    (same settings hash, no parent); otherwise PipelineMismatchError (other settings) or StoreError (not
    there yet, or corrupt). Never trains, copies or writes.
    """
    if cfg.pipeline.teacher_uri:
        raise PipelineMismatchError(f"a shared teacher ({store.uri(key)}) and pipeline.teacher_uri "
                                    f"({cfg.pipeline.teacher_uri}) both name this pipeline's teacher; give one")
    want = lineage.teacher_lineage(cfg)
    problem = store.problem(key)
    if problem is not None:
        raise StoreError(f"shared teacher at {store.uri(key)} is not complete ({problem}); run the pipeline that "
                         f"trains it first")
    differs = lineage.difference(store.read_manifest(key) or {}, want)
    if differs is not None:
        raise PipelineMismatchError(f"shared teacher at {store.uri(key)} was made from {differs}; it is not this "
                                    f"pipeline's teacher, so it is not shared")
    manifest = store.read_manifest(key) or {}
    log.info("teacher: sharing %s (sha256 %s), made with this pipeline's teacher settings", store.uri(key),
             str(manifest.get("sha256"))[:12])
    return CheckpointInfo(key=key, uri=store.uri(key), sha256=manifest["sha256"], steps=cfg.distill.start_steps,
                          round=0, trained=False, train_seconds=0.0, resumed_from=0)


def import_teacher(cfg: Config, store: CheckpointStore, *, uri: str) -> CheckpointInfo:
    """Copy a verified teacher checkpoint from any store URI into this pipeline (its sha256 becomes the parent),
    or import a diffusers folder (``diffusers:<folder or fsspec URL>``, :func:`import_diffusers_teacher`)."""
    if is_diffusers_uri(uri) and text_to_image.is_text_pipeline(cfg):
        return text_to_image.import_text_teacher(cfg, store, uri=uri)
    if is_diffusers_uri(uri):
        return import_diffusers_teacher(cfg, store, uri=uri)
    src_root, src_key = split_uri(uri)
    src = CheckpointStore(src_root, storage_options=dict(cfg.storage.storage_options))
    tensors, manifest = src.load_checkpoint(src_key)
    arch = _architecture(manifest, source=uri)
    check_weights_fit(tensors, arch, source=uri)
    _check_finite_import(tensors, source=uri)
    if manifest.get("parameterization") != cfg.diffusion.parameterization:
        raise PipelineMismatchError(f"{uri} uses parameterization {manifest.get('parameterization')!r}, the config "
                                    f"{cfg.diffusion.parameterization!r}; set diffusion.parameterization to match")
    key = teacher_key(cfg.pipeline.name)
    start = cfg.distill.start_steps
    want = lineage.teacher_lineage(cfg, source_sha256=manifest.get("sha256"))
    new_manifest = _manifest(cfg, kind="teacher", spec=None, steps=start, round_index=0, lineage_=want,
                             schedule=manifest_schedule(manifest),
                             extra={"imported_from": uri, **arch.manifest_fields()})
    ref = dist.run_on_main(lambda: store.save_checkpoint(key, tensors=tensors, manifest=new_manifest))
    log.info("teacher imported from %s to %s", uri, ref.uri)
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=False,
                          train_seconds=0.0, resumed_from=0)


def _check_finite_import(weights: dict[str, torch.Tensor], *, source: str) -> None:
    """NonFiniteOutputError (never retried) when a teacher to import holds NaN or infinite weights."""
    bad = finite.nonfinite_weights(weights)
    if bad:
        raise finite.NonFiniteOutputError(f"teacher at {source}: {bad} of its weights are NaN or infinite; nothing was "
                                          f"imported: point pipeline.teacher_uri at a model with finite weights")


def _architecture(manifest: dict, *, source: str) -> Architecture:
    """The network a checkpoint's manifest describes, or StoreError naming the checkpoint."""
    try:
        return architecture_from_manifest(manifest)
    except (ValueError, TypeError, KeyError) as err:
        raise StoreError(f"{source}: the manifest does not describe a network this version can build ({err})") from err


def _check_data_fits(data: ImageData, arch: Architecture, *, source: str) -> None:
    """The teacher denoises images of the data's shape and, when class-conditional, knows the data's labels."""
    shape = tuple(data.images.shape[1:])
    if shape != tuple(arch.image_shape):
        raise ValueError(f"{source} denoises images of shape {list(arch.image_shape)} (C, H, W) but data.name="
                         f"{data.name!r} gives {list(shape)}: distill it on the images it was trained on "
                         f"(data.image_size {arch.image_shape[1]}, {arch.image_shape[0]} channel(s))")
    num_classes = arch.num_classes
    if num_classes == 0:
        return
    if data.labels is None:
        raise ValueError(f"{source} is class-conditional ({num_classes} classes) but data.name={data.name!r} has "
                         f"no labels; distill it on labelled data")
    top = int(data.labels.max()) if len(data.labels) else -1
    if top >= num_classes:
        raise ValueError(f"{source} knows {num_classes} classes but the data has label {top}; use data whose "
                         f"labels are 0 .. {num_classes - 1}")


def import_diffusers_teacher(cfg: Config, store: CheckpointStore, *, uri: str) -> CheckpointInfo:
    """Import a diffusers UNet2DModel and its scheduler config as this pipeline's teacher.

    The checkpoint holds the model's tensors (safetensors, read without unpickling), its config,
    its scheduler config and discrete schedule, and the parameterization its ``prediction_type``
    names; the sha256 of the source weights file becomes the parent. The first round's grid
    (``distill.start_steps`` steps) must not be finer than the model's training timesteps.
    """
    model = read_diffusers_model(uri, storage_options=dict(cfg.storage.storage_options))
    start = cfg.distill.start_steps
    check_timesteps(steps=start, num_train_timesteps=model.num_train_timesteps, source=uri)
    _check_finite_import(model.weights, source=uri)
    arch = DiffusersUNet2D.of(model.unet_config, schedule=model.schedule, scheduler_config=model.scheduler_config)
    key = teacher_key(cfg.pipeline.name)
    want = lineage.teacher_lineage(cfg, source_sha256=model.weights_sha256)
    manifest = _manifest(cfg, kind="teacher", spec=None, steps=start, round_index=0, lineage_=want,
                         schedule=model.schedule,
                         extra={"imported_from": uri, **arch.manifest_fields(),
                                "parameterization": model.parameterization,
                                "num_train_timesteps": model.num_train_timesteps})
    ref = dist.run_on_main(lambda: store.save_checkpoint(key, tensors=model.weights, manifest=manifest))
    log.info("teacher imported from %s (UNet2DModel, %s prediction, %d timesteps) to %s", uri,
             model.parameterization, model.num_train_timesteps, ref.uri)
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=False,
                          train_seconds=0.0, resumed_from=0)


def _load_parent(store: CheckpointStore, parent: CheckpointInfo) -> tuple[dict[str, torch.Tensor], dict, Architecture]:
    """The weights, manifest and architecture of the checkpoint a job starts from, checked against ``parent``."""
    weights, manifest = store.load_checkpoint(parent.key)
    if manifest["sha256"] != parent.sha256:
        raise StoreError(f"{parent.uri} changed since it was produced (sha256 {manifest['sha256'][:12]} != "
                         f"{parent.sha256[:12]}); rerun the pipeline")
    arch = _architecture(manifest, source=parent.uri)  # a student keeps its teacher's architecture
    check_weights_fit(weights, arch, source=parent.uri)
    return weights, manifest, arch


def _parameterizations(cfg: Config, store: CheckpointStore, teacher: CheckpointInfo) -> tuple[str, str]:
    """(the teacher's parameterization, the one its student uses): ``auto`` resolves through the teacher's."""
    teacher_kind = (store.read_manifest(teacher.key) or {}).get("parameterization", cfg.diffusion.parameterization)
    return teacher_kind, student_parameterization(requested=cfg.distill.student_parameterization, teacher=teacher_kind)


GUIDE_SEED_OFFSET = 500  # stage 1 draws from pipeline.seed + 500 (the teacher from the seed, round r from + 1000 r)
GUIDE_RESTART = 1  # --restart-from 1 retrains stage 1 (it comes right before round 1) and every round after it


def guide_phase(*, steps: int) -> str:
    """``guide-distill (8 steps)``: the label of stage 1 in logs and errors."""
    return f"guide-distill ({steps} steps)"


def run_guide_distill(cfg: Config, store: CheckpointStore, *, teacher: CheckpointInfo,
                      data: ImageData | None = None, on_progress: ProgressCallback | None = None,
                      fault_at_step: int | None = None) -> CheckpointInfo:
    """Stage 1 of guided distillation (pd_core.guidance): a student that takes w learns the guided teacher.

    The student is the teacher's net plus a zero-initialised guidance embedding; it samples in the
    teacher's step count and becomes round 1's teacher. Reused when complete with the same lineage
    (:func:`pd_core.lineage.guided_lineage`, parent: the teacher), resumable, and complete only after
    its samples at w = guidance.w_max are finite. ``--restart-from 1`` retrains it.
    """
    key = guided_key(cfg.pipeline.name)
    steps = teacher.steps
    phase = guide_phase(steps=steps)
    teacher_kind, student_kind = _parameterizations(cfg, store, teacher)
    if text_to_image.is_text_pipeline(cfg):
        student_kind = teacher_kind  # zero-initialised, it starts as the teacher only when it reads it the same way
    want = lineage.guided_lineage(cfg, teacher_steps=steps, parent_sha256=teacher.sha256,
                                  student_parameterization=student_kind,
                                  encoded_data=text_to_image.encoded_sha256(cfg, store),
                                  teacher_folder=text_to_image.teacher_folder_sha256(cfg, store))
    found = _reusable(store, cfg, key, want=want, label=phase, steps=steps, round_index=0,
                      restart_index=GUIDE_RESTART)
    if found is not None:
        return found
    teacher_weights, teacher_manifest, teacher_arch = _load_parent(store, teacher)
    data = data if data is not None else load_train_data(cfg, store)
    teacher_arch = text_to_image.with_caption_table(teacher_arch, data)
    if not (isinstance(teacher_arch, PdUNet | CaptionTableArch) and teacher_arch.num_classes > 0
            and teacher_arch.null_class and not teacher_arch.guidance_embedding):
        raise PipelineMismatchError(f"{teacher.uri} is not a class-conditional teacher with a null class; guided "
                                    f"distillation needs one (model.class_conditional, teacher.label_dropout > 0)")
    _check_data_fits(data, teacher_arch, source=teacher.uri)
    runtime = resolve_runtime(cfg.runtime)
    schedule = manifest_schedule(teacher_manifest)
    seed = cfg.pipeline.seed + GUIDE_SEED_OFFSET
    arch = teacher_arch.with_guidance_embedding()
    state = new_guided_student_state(teacher_weights=teacher_weights, arch=arch, distill_cfg=cfg.distill,
                                     guidance_cfg=cfg.guidance, runtime=runtime, seed=seed)
    # Build every network BEFORE resuming: a network's init draws from the global RNG, which _resume restores.
    teacher_net = frozen_teacher(weights=teacher_weights, arch=teacher_arch, runtime=runtime)
    _resume(store, key, state, want=want, label=phase, is_main=runtime.is_main)
    g = cfg.guidance
    batches = BatchSampler(data, batch_size=g.batch_size, seed=seed, random_flip=cfg.data.random_flip)
    result = guide_distill(state=state, teacher_net=teacher_net, null_label=teacher_arch.num_classes, guidance_cfg=g,
                           diffusion_cfg=cfg.diffusion, schedule=schedule, runtime=runtime, sample_batch=batches.batch,
                           teacher_parameterization=teacher_kind, student_parameterization=student_kind,
                           on_checkpoint=_state_saver(store, key, want), on_progress=on_progress,
                           fault_at_step=fault_at_step)
    manifest = _manifest(cfg, kind="guided_student", spec=None, steps=steps, round_index=0, lineage_=want,
                         schedule=schedule,
                         extra={"updates": g.updates, "teacher_steps": steps, "w_min": g.w_min, "w_max": g.w_max,
                                **_timing(result), **arch.without_dropout().manifest_fields(),
                                "parameterization": student_kind, "teacher_parameterization": teacher_kind,
                                **text_to_image.source_fields(teacher_manifest)})
    _check_finite_student(result.weights, manifest, label=phase, round_index=GUIDE_RESTART, device=runtime.device,
                          w=g.w_max, section="guidance", arch=arch)
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("%s saved to %s (sha256 %s)", phase, info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


def _guidance_range(cfg: Config, store: CheckpointStore, teacher: CheckpointInfo) -> tuple[float, float] | None:
    """(guidance.w_min, guidance.w_max) when the teacher takes w (a round of guided distillation's stage 2); None."""
    takes_w = _architecture(store.read_manifest(teacher.key) or {}, source=teacher.uri).guidance_embedding
    return (cfg.guidance.w_min, cfg.guidance.w_max) if takes_w else None


def run_round(cfg: Config, store: CheckpointStore, *, round_index: int, teacher: CheckpointInfo,
              data: ImageData | None = None, on_progress: ProgressCallback | None = None,
              fault_at_step: int | None = None) -> CheckpointInfo:
    """Round ``round_index``: distill the teacher (2N steps) into a student (N steps); resumable.

    A teacher that takes w (guided distillation's stage-1 student or a stage-2 round's) makes this a
    round of stage 2: teacher and student see w ~ U[guidance.w_min, guidance.w_max] with the label.
    """
    teacher_steps = teacher.steps
    student_steps = teacher_steps // 2
    key = round_key(cfg.pipeline.name, round_index=round_index, student_steps=student_steps)
    phase = round_phase(round_index=round_index, teacher_steps=teacher_steps, student_steps=student_steps)
    # ``auto`` resolves through the teacher's parameterization: the lineage records what it resolved to.
    teacher_kind, student_kind = _parameterizations(cfg, store, teacher)
    guidance_range = _guidance_range(cfg, store, teacher)
    want = lineage.round_lineage(cfg, round_index=round_index, teacher_steps=teacher_steps,
                                 parent_sha256=teacher.sha256, student_parameterization=student_kind,
                                 guidance_range=guidance_range, encoded_data=text_to_image.encoded_sha256(cfg, store),
                                 teacher_folder=text_to_image.teacher_folder_sha256(cfg, store))
    found = _reusable(store, cfg, key, want=want, label=phase, steps=student_steps, round_index=round_index)
    if found is not None:
        return found
    data = data if data is not None else load_train_data(cfg, store)
    runtime = resolve_runtime(cfg.runtime)
    teacher_weights, teacher_manifest, arch = _load_parent(store, teacher)
    arch = text_to_image.with_caption_table(arch, data)  # a text UNet: caption indices as class labels
    _check_data_fits(data, arch, source=teacher.uri)
    schedule = manifest_schedule(teacher_manifest)  # a round keeps its teacher's schedule
    seed = cfg.pipeline.seed + 1000 * round_index  # each round sees its own noise and batches
    # Student dropout draws from torch's global RNG: seed it per round, so the masks do not depend on what
    # this process ran before (a rerun that skips the teacher would otherwise draw other masks).
    torch.manual_seed(seed)
    state = new_student_state(teacher_weights=teacher_weights, arch=arch, distill_cfg=cfg.distill, runtime=runtime,
                              seed=seed)
    # Build every network BEFORE resuming: a network's init draws from the global RNG, which _resume restores.
    teacher_net = frozen_teacher(weights=teacher_weights, arch=arch, runtime=runtime)
    _resume(store, key, state, want=want, label=phase, is_main=runtime.is_main)
    updates = cfg.distill.updates_for(student_steps)
    result = distill_round(state=state, teacher_net=teacher_net, student_steps=student_steps, updates=updates,
                           phase=phase, distill_cfg=cfg.distill, diffusion_cfg=cfg.diffusion, schedule=schedule,
                           runtime=runtime, teacher_parameterization=teacher_kind,
                           student_parameterization=student_kind,
                           sample_batch=sampler_for(cfg, data, seed=seed).batch,
                           on_checkpoint=_state_saver(store, key, want), on_progress=on_progress,
                           fault_at_step=fault_at_step, guidance_range=guidance_range)
    manifest = _manifest(cfg, kind="student", spec=None, steps=student_steps,
                         round_index=round_index, lineage_=want, schedule=schedule,
                         extra={"updates": updates, "teacher_steps": teacher_steps, **_timing(result),
                                **arch.without_dropout().manifest_fields(),
                                "parameterization": student_kind, "teacher_parameterization": teacher_kind,
                                **({"w_min": guidance_range[0], "w_max": guidance_range[1]} if guidance_range else {}),
                                **text_to_image.source_fields(teacher_manifest)})
    _check_finite_student(result.weights, manifest, label=phase, round_index=round_index, device=runtime.device,
                          w=guidance_range[1] if guidance_range else 0.0, arch=arch)
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("%s saved to %s (sha256 %s)", phase, info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


__all__ = ["CheckpointInfo", "PipelineMismatchError", "ensure_teacher", "guided_key", "import_diffusers_teacher",
           "import_teacher", "open_store", "pipeline_prefix", "round_key", "round_phase", "run_guide_distill",
           "run_round", "state_key", "teacher_key"]
