"""The units of work of a pipeline, over the checkpoint store: ensure the teacher, run one round.

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
from pd_core.architecture import Architecture, DiffusersUNet2D, architecture_from_manifest
from pd_core.config import Config, config_hash
from pd_core.data import BatchSampler, ImageData, load_split
from pd_core.interop.diffusers import read_diffusers_model
from pd_core.interop.diffusers_folder import check_timesteps, is_diffusers_uri
from pd_core.kinds import student_parameterization
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
    new_student_state,
    new_teacher_state,
    resolve_runtime,
    train_teacher,
)
from pd_core.unet import UNetSpec, spec_to_dict, unet_spec

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
    """Hash of the settings that decide the weights (not evaluation/storage/tracking)."""
    return config_hash(cfg, sections=TRAINING_SECTIONS)


def pipeline_prefix(name: str) -> str:
    """Where a pipeline's checkpoints, report and lease live in the store."""
    return f"pipelines/{name}"


def teacher_key(name: str) -> str:
    """``pipelines/<name>/teacher``."""
    return f"{pipeline_prefix(name)}/teacher"


def round_key(name: str, *, round_index: int, student_steps: int) -> str:
    """``pipelines/<name>/rounds/03-0032``: round 3 trains the 32-step student."""
    return f"{pipeline_prefix(name)}/rounds/{round_index:02d}-{student_steps:04d}"


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


def _manifest(cfg: Config, *, kind: str, spec: UNetSpec | None, steps: int, round_index: int,
              parent_sha256: str | None, schedule: Schedule, extra: dict | None = None) -> dict:
    return {
        "kind": kind,
        "round": round_index,
        "steps": steps,
        "parent_sha256": parent_sha256,
        "config_hash": training_hash(cfg),
        "pipeline": cfg.pipeline.name,
        "unet": spec_to_dict(spec) if spec is not None else None,  # None: another architecture, named in extra
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
                           fault_at_step=fault_at_step)
    manifest = _manifest(cfg, kind="teacher", spec=spec, steps=start, round_index=0, parent_sha256=None,
                         schedule=_config_schedule(cfg), extra={"updates": result.steps, **_timing(result)})
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("teacher saved to %s (sha256 %s)", info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


def import_teacher(cfg: Config, store: CheckpointStore, *, uri: str) -> CheckpointInfo:
    """Copy a verified teacher checkpoint from any store URI into this pipeline (its sha256 becomes the parent),
    or import a diffusers folder (``diffusers:<folder or fsspec URL>``, :func:`import_diffusers_teacher`)."""
    if is_diffusers_uri(uri):
        return import_diffusers_teacher(cfg, store, uri=uri)
    src_root, src_key = split_uri(uri)
    src = CheckpointStore(src_root, storage_options=dict(cfg.storage.storage_options))
    tensors, manifest = src.load_checkpoint(src_key)
    arch = _architecture(manifest, source=uri)
    check_weights_fit(tensors, arch, source=uri)
    if manifest.get("parameterization") != cfg.diffusion.parameterization:
        raise PipelineMismatchError(f"{uri} uses parameterization {manifest.get('parameterization')!r}, the config "
                                    f"{cfg.diffusion.parameterization!r}; set diffusion.parameterization to match")
    key = teacher_key(cfg.pipeline.name)
    start = cfg.distill.start_steps
    new_manifest = _manifest(cfg, kind="teacher", spec=None, steps=start, round_index=0,
                             parent_sha256=manifest.get("sha256"), schedule=manifest_schedule(manifest),
                             extra={"imported_from": uri, **arch.manifest_fields()})
    ref = dist.run_on_main(lambda: store.save_checkpoint(key, tensors=tensors, manifest=new_manifest))
    log.info("teacher imported from %s to %s", uri, ref.uri)
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=False,
                          train_seconds=0.0, resumed_from=0)


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


def _check_same_student_parameterization(cfg: Config, store: CheckpointStore, *, key: str,
                                         teacher: CheckpointInfo) -> None:
    """A finished student is reused only with the parameterization this config gives it now (``auto`` resolves
    through the teacher, so the config hash alone does not pin it)."""
    have = store.read_manifest(key).get("parameterization")
    teacher_kind = store.read_manifest(teacher.key)["parameterization"]
    want = student_parameterization(requested=cfg.distill.student_parameterization, teacher=teacher_kind)
    if have != want:
        raise PipelineMismatchError(f"{store.uri(key)} predicts {have!r} but distill.student_parameterization="
                                    f"{cfg.distill.student_parameterization!r} gives {want!r} for its {teacher_kind!r} "
                                    f"teacher; use another pipeline name (--name) or set it to {have!r}")


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
    arch = DiffusersUNet2D.of(model.unet_config, schedule=model.schedule, scheduler_config=model.scheduler_config)
    key = teacher_key(cfg.pipeline.name)
    manifest = _manifest(cfg, kind="teacher", spec=None, steps=start, round_index=0,
                         parent_sha256=model.weights_sha256, schedule=model.schedule,
                         extra={"imported_from": uri, **arch.manifest_fields(),
                                "parameterization": model.parameterization,
                                "num_train_timesteps": model.num_train_timesteps})
    ref = dist.run_on_main(lambda: store.save_checkpoint(key, tensors=model.weights, manifest=manifest))
    log.info("teacher imported from %s (UNet2DModel, %s prediction, %d timesteps) to %s", uri,
             model.parameterization, model.num_train_timesteps, ref.uri)
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=False,
                          train_seconds=0.0, resumed_from=0)


def run_round(cfg: Config, store: CheckpointStore, *, round_index: int, teacher: CheckpointInfo,
              data: ImageData | None = None, on_progress: ProgressCallback | None = None,
              fault_at_step: int | None = None) -> CheckpointInfo:
    """Round ``round_index``: distill the teacher (2N steps) into a student (N steps); resumable."""
    teacher_steps = teacher.steps
    student_steps = teacher_steps // 2
    key = round_key(cfg.pipeline.name, round_index=round_index, student_steps=student_steps)
    found = _existing(store, cfg, key, steps=student_steps, round_index=round_index)
    if found is not None:
        _check_same_student_parameterization(cfg, store, key=key, teacher=teacher)
        return found
    data = data if data is not None else load_train_data(cfg)
    runtime = resolve_runtime(cfg.runtime)
    teacher_weights, teacher_manifest = store.load_checkpoint(teacher.key)
    if teacher_manifest["sha256"] != teacher.sha256:
        raise StoreError(f"{teacher.uri} changed since it was produced (sha256 {teacher_manifest['sha256'][:12]} != "
                         f"{teacher.sha256[:12]}); rerun the pipeline")
    arch = _architecture(teacher_manifest, source=teacher.uri)  # the student keeps its teacher's architecture
    check_weights_fit(teacher_weights, arch, source=teacher.uri)
    _check_data_fits(data, arch, source=teacher.uri)
    schedule = manifest_schedule(teacher_manifest)  # a round keeps its teacher's schedule
    teacher_kind = teacher_manifest["parameterization"]
    student_kind = student_parameterization(requested=cfg.distill.student_parameterization, teacher=teacher_kind)
    seed = cfg.pipeline.seed + 1000 * round_index  # each round sees its own noise and batches
    # Student dropout draws from torch's global RNG: seed it per round, so the masks do not depend on what
    # this process ran before (a rerun that skips the teacher would otherwise draw other masks).
    torch.manual_seed(seed)
    state = new_student_state(teacher_weights=teacher_weights, arch=arch, distill_cfg=cfg.distill, runtime=runtime,
                              seed=seed)
    # Build every network BEFORE resuming: a network's init draws from the global RNG, which _resume restores.
    teacher_net = frozen_teacher(weights=teacher_weights, arch=arch, runtime=runtime)
    _resume(store, key, state)
    updates = cfg.distill.updates_for(student_steps)
    phase = round_phase(round_index=round_index, teacher_steps=teacher_steps, student_steps=student_steps)
    result = distill_round(state=state, teacher_net=teacher_net, student_steps=student_steps, updates=updates,
                           phase=phase, distill_cfg=cfg.distill, diffusion_cfg=cfg.diffusion, schedule=schedule,
                           runtime=runtime, teacher_parameterization=teacher_kind,
                           student_parameterization=student_kind,
                           sample_batch=sampler_for(cfg, data, seed=seed).batch,
                           on_checkpoint=_state_saver(store, key), on_progress=on_progress,
                           fault_at_step=fault_at_step)
    manifest = _manifest(cfg, kind="student", spec=None, steps=student_steps,
                         round_index=round_index, parent_sha256=teacher.sha256, schedule=schedule,
                         extra={"updates": updates, "teacher_steps": teacher_steps, **_timing(result),
                                **arch.without_dropout().manifest_fields(),
                                "parameterization": student_kind, "teacher_parameterization": teacher_kind})
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("%s saved to %s (sha256 %s)", phase, info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


__all__ = ["CheckpointInfo", "PipelineMismatchError", "ensure_teacher", "import_diffusers_teacher", "import_teacher",
           "open_store", "round_key", "run_round", "state_key", "teacher_key", "training_hash"]
