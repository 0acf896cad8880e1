"""The units of work of a pipeline, over the checkpoint store: ensure the teacher, guided distillation's
stage 1 (when guidance.enabled), run one round.

Each job is idempotent and resumable: a complete, verified checkpoint at its key means "done"
(skipped); an in-round state next to it means "continue from there". In a data-parallel job every
rank calls the same job; rank 0 alone writes, at the call sites marked ``dist.run_on_main`` and
``runtime.is_main``. Prefect tasks, the torchrun child and the CLI call these; nothing here imports
Prefect or MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd_core import dist
from pd_core.config import Config, config_hash
from pd_core.data import BatchSampler, ImageData, load_split
from pd_core.models import check_weights_fit, manifest_schedule, split_uri
from pd_core.schedule import CosineSchedule, Schedule
from pd_core.store import CheckpointStore, StoreError
from pd_core.train import (
    ProgressCallback,
    TrainResult,
    TrainState,
    copy_weights,
    distill_round,
    frozen_teacher,
    guide_distill,
    new_guided_student_state,
    new_student_state,
    new_teacher_state,
    resolve_runtime,
    train_teacher,
)
from pd_core.unet import UNetSpec, spec_from_dict, spec_to_dict, unet_spec

log = logging.getLogger(__name__)

TRAINING_SECTIONS = ("model", "diffusion", "data", "teacher", "distill")


class PipelineMismatchError(ValueError):
    """A stored checkpoint was made with different training settings than the current config."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What tasks pass around: where a checkpoint is and what it is, never the tensors."""

    key: str  # key inside the store, e.g. pipelines/demo/rounds/02-0016
    uri: str  # full URL, e.g. file:///.../pipelines/demo/rounds/02-0016
    sha256: str  # sha256 of the weights file
    steps: int  # sampling steps this model is trained for
    round: int  # 0 for the teacher
    trained: bool  # False when the checkpoint already existed (skipped)
    train_seconds: float  # wall time of training in this call (0 when skipped)
    resumed_from: int  # update the training resumed at (0 for a fresh start)
    mlflow_run_id: str | None = None  # the MLflow run that tracks it (set by the orchestration layer)

    def tracked(self, run_id: str | None) -> CheckpointInfo:
        """The same info with its MLflow run id."""
        return dataclasses.replace(self, mlflow_run_id=run_id)


def training_hash(cfg: Config) -> str:
    """Hash of the settings that decide the weights (not evaluation/storage/tracking).

    The guidance section counts only when guided distillation is on, and teacher.label_dropout only
    when it is not 0: a config that uses neither hashes as one without these fields.
    """
    sections = TRAINING_SECTIONS + (("guidance",) if cfg.guidance.enabled else ())
    omit = () if cfg.teacher.label_dropout else ("teacher.label_dropout",)
    return config_hash(cfg, sections=sections, omit=omit)


def pipeline_prefix(name: str) -> str:
    """Where a pipeline's checkpoints, report and lease live in the store."""
    return f"pipelines/{name}"


def teacher_key(name: str) -> str:
    """``pipelines/<name>/teacher``."""
    return f"{pipeline_prefix(name)}/teacher"


def round_key(name: str, *, round_index: int, student_steps: int) -> str:
    """``pipelines/<name>/rounds/03-0032``: round 3 trains the 32-step student."""
    return f"{pipeline_prefix(name)}/rounds/{round_index:02d}-{student_steps:04d}"


def guided_key(name: str) -> str:
    """``pipelines/<name>/guided``: the stage-1 student of guided distillation."""
    return f"{pipeline_prefix(name)}/guided"


def state_key(key: str) -> str:
    """Where a checkpoint's in-progress training state lives."""
    return f"{key}.state"


def round_phase(*, round_index: int, teacher_steps: int, student_steps: int) -> str:
    """``round 3 (64->32)``: the label of a round in logs and errors."""
    return f"round {round_index} ({teacher_steps}->{student_steps})"


def open_store(cfg: Config) -> CheckpointStore:
    """The checkpoint store named by ``storage.root`` (credentials come from the environment)."""
    return CheckpointStore(cfg.storage.root, storage_options=dict(cfg.storage.storage_options))


def _model_spec(cfg: Config, data: ImageData) -> UNetSpec:
    return unet_spec(cfg, in_channels=data.images.shape[1], num_classes=data.num_classes)


def _manifest(cfg: Config, *, kind: str, spec: UNetSpec, steps: int, round_index: int, parent_sha256: str | None,
              schedule: Schedule, extra: dict | None = None) -> dict:
    return {
        "kind": kind,
        "round": round_index,
        "steps": steps,
        "parent_sha256": parent_sha256,
        "config_hash": training_hash(cfg),
        "pipeline": cfg.pipeline.name,
        "unet": spec_to_dict(spec),
        "parameterization": cfg.diffusion.parameterization,
        "logsnr_min": cfg.diffusion.logsnr_min,
        "logsnr_max": cfg.diffusion.logsnr_max,
        "schedule": schedule.to_dict(),
        **(extra or {}),
    }


def _config_schedule(cfg: Config) -> Schedule:
    """The schedule of a teacher trained here: the cosine over diffusion.logsnr_min .. logsnr_max."""
    return CosineSchedule(logsnr_min=cfg.diffusion.logsnr_min, logsnr_max=cfg.diffusion.logsnr_max)


def _timing(result: TrainResult) -> dict[str, float | int]:
    """Training wall time for the manifest (the finishing call's; resumed_from > 0 says earlier work is not in it)."""
    return {"train_seconds": round(float(result.seconds), 1), "resumed_from": int(result.resumed_from)}


def _check_same_training(cfg: Config, manifest: dict, *, uri: str) -> None:
    have, want = manifest.get("config_hash"), training_hash(cfg)
    if have != want:
        raise PipelineMismatchError(
            f"{uri} was trained with different settings (config hash {have} != {want}); "
            f"use another pipeline name (--name) or a fresh storage root")


def _existing(store: CheckpointStore, cfg: Config, key: str, *, steps: int, round_index: int) -> CheckpointInfo | None:
    if not store.is_complete(key):
        return None
    manifest = store.read_manifest(key)
    _check_same_training(cfg, manifest, uri=store.uri(key))
    log.info("%s is complete and verified: skipped", store.uri(key))
    return CheckpointInfo(key=key, uri=store.uri(key), sha256=manifest["sha256"], steps=steps, round=round_index,
                          trained=False, train_seconds=0.0, resumed_from=0)


def _resume(store: CheckpointStore, key: str, state: TrainState) -> None:
    saved = store.load_state(state_key(key))
    if saved is not None:
        tensors, meta = saved
        state.load_tensors(tensors, meta)
        log.info("resuming %s from update %d", store.uri(key), state.step)


def _state_saver(store: CheckpointStore, key: str) -> Callable[[TrainState], None]:
    """The in-round checkpoint hook (the training loop calls it on rank 0 only)."""
    def save(state: TrainState) -> None:
        tensors, meta = state.to_tensors()
        store.save_state(state_key(key), tensors=tensors, meta=meta)
    return save


def _publish(store: CheckpointStore, key: str, *, weights: dict[str, torch.Tensor], manifest: dict,
             is_main: bool) -> CheckpointInfo:
    """Save the finished checkpoint and drop its in-round state: rank 0 writes, every rank gets the reference."""
    ref = dist.run_on_main(lambda: store.save_checkpoint(key, tensors=copy_weights(weights), manifest=manifest))
    if is_main:
        store.clear_state(state_key(key))
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=int(manifest["steps"]),
                          round=int(manifest["round"]), trained=True,
                          train_seconds=float(manifest.get("train_seconds", 0.0)),
                          resumed_from=int(manifest.get("resumed_from", 0)))


def load_train_data(cfg: Config) -> ImageData:
    """The training split of ``cfg.data``."""
    return load_split(cfg.data, split="train")


def sampler_for(cfg: Config, data: ImageData, *, seed: int) -> BatchSampler:
    """A round's batch sampler (distill.batch_size per process)."""
    return BatchSampler(data, batch_size=cfg.distill.batch_size, seed=seed, random_flip=cfg.data.random_flip)


def ensure_teacher(cfg: Config, store: CheckpointStore, *, data: ImageData | None = None,
                   on_progress: ProgressCallback | None = None, fault_at_step: int | None = None) -> CheckpointInfo:
    """The pipeline's teacher checkpoint: existing (skip), imported (pipeline.teacher_uri), or trained."""
    key = teacher_key(cfg.pipeline.name)
    start = cfg.distill.start_steps
    found = _existing(store, cfg, key, steps=start, round_index=0)
    if found is not None:
        return found
    if cfg.pipeline.teacher_uri:
        return import_teacher(cfg, store, uri=cfg.pipeline.teacher_uri)
    data = data if data is not None else load_train_data(cfg)
    runtime = resolve_runtime(cfg.runtime)
    spec = _model_spec(cfg, data)
    seed = cfg.pipeline.seed
    state = new_teacher_state(spec=spec, teacher_cfg=cfg.teacher, runtime=runtime, seed=seed)
    _resume(store, key, state)
    batches = BatchSampler(data, batch_size=cfg.teacher.batch_size, seed=seed, random_flip=cfg.data.random_flip)
    result = train_teacher(state=state, teacher_cfg=cfg.teacher, diffusion_cfg=cfg.diffusion, runtime=runtime,
                           sample_batch=batches.batch, on_checkpoint=_state_saver(store, key), on_progress=on_progress,
                           fault_at_step=fault_at_step, null_label=spec.num_classes if spec.null_class else None)
    manifest = _manifest(cfg, kind="teacher", spec=spec, steps=start, round_index=0, parent_sha256=None,
                         schedule=_config_schedule(cfg), extra={"updates": result.steps, **_timing(result)})
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("teacher saved to %s (sha256 %s)", info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


def import_teacher(cfg: Config, store: CheckpointStore, *, uri: str) -> CheckpointInfo:
    """Copy a verified teacher checkpoint from any store URI into this pipeline (its sha256 becomes the parent)."""
    src_root, src_key = split_uri(uri)
    src = CheckpointStore(src_root, storage_options=dict(cfg.storage.storage_options))
    tensors, manifest = src.load_checkpoint(src_key)
    spec = spec_from_dict(manifest["unet"])
    check_weights_fit(tensors, spec, source=uri)
    if manifest.get("parameterization") != cfg.diffusion.parameterization:
        raise PipelineMismatchError(f"{uri} uses parameterization {manifest.get('parameterization')!r}, the config "
                                    f"{cfg.diffusion.parameterization!r}; set diffusion.parameterization to match")
    key = teacher_key(cfg.pipeline.name)
    start = cfg.distill.start_steps
    new_manifest = _manifest(cfg, kind="teacher", spec=spec, steps=start, round_index=0,
                             parent_sha256=manifest.get("sha256"), schedule=manifest_schedule(manifest),
                             extra={"imported_from": uri})
    ref = dist.run_on_main(lambda: store.save_checkpoint(key, tensors=tensors, manifest=new_manifest))
    log.info("teacher imported from %s to %s", uri, ref.uri)
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=False,
                          train_seconds=0.0, resumed_from=0)


def _load_parent(store: CheckpointStore, parent: CheckpointInfo) -> tuple[dict[str, torch.Tensor], dict, UNetSpec]:
    """The weights, manifest and architecture of the checkpoint a job starts from, checked against ``parent``."""
    weights, manifest = store.load_checkpoint(parent.key)
    if manifest["sha256"] != parent.sha256:
        raise StoreError(f"{parent.uri} changed since it was produced (sha256 {manifest['sha256'][:12]} != "
                         f"{parent.sha256[:12]}); rerun the pipeline")
    spec = spec_from_dict(manifest["unet"])
    check_weights_fit(weights, spec, source=parent.uri)
    return weights, manifest, spec


GUIDE_SEED_OFFSET = 500  # stage 1 draws from pipeline.seed + 500 (the teacher from the seed, round r from + 1000 r)


def run_guide_distill(cfg: Config, store: CheckpointStore, *, teacher: CheckpointInfo,
                      data: ImageData | None = None, on_progress: ProgressCallback | None = None,
                      fault_at_step: int | None = None) -> CheckpointInfo:
    """Stage 1 of guided distillation (pd_core.guidance): a student that takes w learns the guided teacher.

    The student is the teacher's net plus a zero-initialised guidance embedding; it samples in the
    teacher's step count and becomes round 1's teacher. Skipped when complete, resumable.
    """
    key = guided_key(cfg.pipeline.name)
    steps = teacher.steps
    found = _existing(store, cfg, key, steps=steps, round_index=0)
    if found is not None:
        return found
    teacher_weights, teacher_manifest, teacher_spec = _load_parent(store, teacher)
    if teacher_spec.num_classes < 1 or not teacher_spec.null_class or teacher_spec.guidance_embedding:
        raise PipelineMismatchError(f"{teacher.uri} is not a class-conditional teacher with a null class; guided "
                                    f"distillation needs one (model.class_conditional, teacher.label_dropout > 0)")
    data = data if data is not None else load_train_data(cfg)
    runtime = resolve_runtime(cfg.runtime)
    schedule = manifest_schedule(teacher_manifest)
    seed = cfg.pipeline.seed + GUIDE_SEED_OFFSET
    spec = dataclasses.replace(teacher_spec, guidance_embedding=True)
    state = new_guided_student_state(teacher_weights=teacher_weights, spec=spec, distill_cfg=cfg.distill,
                                     guidance_cfg=cfg.guidance, runtime=runtime, seed=seed)
    teacher_net = frozen_teacher(weights=teacher_weights, spec=teacher_spec, runtime=runtime)
    _resume(store, key, state)
    g = cfg.guidance
    batches = BatchSampler(data, batch_size=g.batch_size, seed=seed, random_flip=cfg.data.random_flip)
    result = guide_distill(state=state, teacher_net=teacher_net, null_label=teacher_spec.num_classes, guidance_cfg=g,
                           diffusion_cfg=cfg.diffusion, schedule=schedule, runtime=runtime, sample_batch=batches.batch,
                           on_checkpoint=_state_saver(store, key), on_progress=on_progress,
                           fault_at_step=fault_at_step)
    manifest = _manifest(cfg, kind="guided_student", spec=dataclasses.replace(spec, dropout=0.0), steps=steps,
                         round_index=0, parent_sha256=teacher.sha256, schedule=schedule,
                         extra={"updates": g.updates, "teacher_steps": steps, "w_min": g.w_min, "w_max": g.w_max,
                                **_timing(result)})
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("guide-distill saved to %s (sha256 %s)", info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


def run_round(cfg: Config, store: CheckpointStore, *, round_index: int, teacher: CheckpointInfo,
              data: ImageData | None = None, on_progress: ProgressCallback | None = None,
              fault_at_step: int | None = None) -> CheckpointInfo:
    """Round ``round_index``: distill the teacher (2N steps) into a student (N steps); resumable."""
    teacher_steps = teacher.steps
    student_steps = teacher_steps // 2
    key = round_key(cfg.pipeline.name, round_index=round_index, student_steps=student_steps)
    found = _existing(store, cfg, key, steps=student_steps, round_index=round_index)
    if found is not None:
        return found
    data = data if data is not None else load_train_data(cfg)
    runtime = resolve_runtime(cfg.runtime)
    teacher_weights, teacher_manifest, spec = _load_parent(store, teacher)
    schedule = manifest_schedule(teacher_manifest)  # a round keeps its teacher's schedule
    seed = cfg.pipeline.seed + 1000 * round_index  # each round sees its own noise and batches
    # Student dropout draws from torch's global RNG: seed it per round, so the masks do not depend on what
    # this process ran before (a rerun that skips the teacher would otherwise draw other masks).
    torch.manual_seed(seed)
    state = new_student_state(teacher_weights=teacher_weights, spec=spec, distill_cfg=cfg.distill, runtime=runtime,
                              seed=seed)
    # Build every network BEFORE resuming: a network's init draws from the global RNG, which _resume restores.
    teacher_net = frozen_teacher(weights=teacher_weights, spec=spec, runtime=runtime)
    _resume(store, key, state)
    updates = cfg.distill.updates_for(student_steps)
    phase = round_phase(round_index=round_index, teacher_steps=teacher_steps, student_steps=student_steps)
    result = distill_round(state=state, teacher_net=teacher_net, student_steps=student_steps, updates=updates,
                           phase=phase, distill_cfg=cfg.distill, diffusion_cfg=cfg.diffusion, schedule=schedule,
                           runtime=runtime,
                           sample_batch=sampler_for(cfg, data, seed=seed).batch,
                           on_checkpoint=_state_saver(store, key), on_progress=on_progress,
                           fault_at_step=fault_at_step,
                           guidance_range=(cfg.guidance.w_min, cfg.guidance.w_max) if spec.guidance_embedding else None)
    manifest = _manifest(cfg, kind="student", spec=dataclasses.replace(spec, dropout=0.0), steps=student_steps,
                         round_index=round_index, parent_sha256=teacher.sha256, schedule=schedule,
                         extra={"updates": updates, "teacher_steps": teacher_steps, **_timing(result)})
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("%s saved to %s (sha256 %s)", phase, info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


__all__ = ["CheckpointInfo", "PipelineMismatchError", "ensure_teacher", "guided_key", "import_teacher", "open_store",
           "round_key", "run_guide_distill", "run_round", "state_key", "teacher_key", "training_hash"]
