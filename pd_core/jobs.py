"""The units of work of a pipeline, over the checkpoint store: ensure the teacher, run one round.

Each job is idempotent and resumable. A complete, verified checkpoint at its key is reused
(skipped) only when its lineage (:mod:`pd_core.lineage`: the hash of the settings that decide its
weights, and its parent's sha256) is what this run would produce; otherwise the job refuses with
one line saying how to go on (``--restart-from N`` or ``--name``). ``pipeline.restart_from = N``
retrains round N and every later round (N = 0: the teacher too) and keeps what comes before N as it
is. An in-round state next to the key means "continue from there" when it carries the same lineage
and is discarded (one log line) when it does not. A corrupt checkpoint is retrained, saying so. A
student is complete only after its samples are finite (:mod:`pd_core.finite`).

In a data-parallel job every rank calls the same job; rank 0 alone writes, at the call sites marked
``dist.run_on_main`` and ``runtime.is_main``. Prefect tasks, the torchrun child and the CLI call
these; nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd_core import dist, finite, lineage
from pd_core.architecture import Architecture, DiffusersUNet2D, architecture_from_manifest
from pd_core.config import Config
from pd_core.data import BatchSampler, ImageData, load_split
from pd_core.interop.diffusers import read_diffusers_model, weights_sha256
from pd_core.interop.diffusers_folder import check_timesteps, is_diffusers_uri
from pd_core.kinds import student_parameterization
from pd_core.lineage import Lineage, PipelineMismatchError
from pd_core.models import check_weights_fit, manifest_schedule, model_from_tensors, split_uri
from pd_core.schedule import CosineSchedule, Schedule
from pd_core.store import NOT_SAVED, CheckpointStore, StoreError
from pd_core.train import (
    ProgressCallback,
    ProgressEvent,
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

HUGE_TEACHER_LOSS = 1e6  # a teacher ending above this final loss almost surely diverged: warned about


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


def _manifest(cfg: Config, *, kind: str, spec: UNetSpec | None, steps: int, round_index: int, lineage_: Lineage,
              schedule: Schedule, extra: dict | None = None) -> dict:
    return {
        "kind": kind,
        "round": round_index,
        "steps": steps,
        **lineage_.manifest_fields(),
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


def _restarting(cfg: Config, round_index: int) -> bool:
    """True when ``pipeline.restart_from`` asks to retrain this round (0 = the teacher)."""
    return cfg.pipeline.restart_from is not None and cfg.pipeline.restart_from <= round_index


def _kept_as_is(cfg: Config, round_index: int) -> bool:
    """True when ``pipeline.restart_from`` keeps this checkpoint as it is (it comes before the restart)."""
    return cfg.pipeline.restart_from is not None and cfg.pipeline.restart_from > round_index


def _reusable(store: CheckpointStore, cfg: Config, key: str, *, want: Lineage, label: str, steps: int,
              round_index: int) -> CheckpointInfo | None:
    """The stored checkpoint at ``key`` when it may be reused; None when the job must (re)train it.

    Missing: None. Corrupt: None, with a log line. Restarted (pipeline.restart_from <= round): None,
    with a log line. Complete with this lineage: reused. Complete with another lineage: None when an
    in-round state of this run's lineage shows a retraining in progress, else PipelineMismatchError.
    """
    uri = store.uri(key)
    problem = store.problem(key)
    if problem == NOT_SAVED:
        return None
    if problem is not None:
        log.warning("%s: the checkpoint at %s is corrupt (%s); retraining it", label, uri, problem)
        return None
    manifest = store.read_manifest(key) or {}
    if _restarting(cfg, round_index):
        log.warning("%s: retraining it (--restart-from %d); the checkpoint at %s (sha256 %s) is replaced when the "
                    "new one is saved", label, cfg.pipeline.restart_from, uri, str(manifest.get("sha256"))[:12])
        return None
    kept = _kept_as_is(cfg, round_index)
    differs = lineage.difference(manifest, want, check_settings=not kept)
    if differs is None:
        settings_differ = kept and lineage.difference(manifest, want) is not None
        log.info("%s: %s is complete and verified: %s", label, uri,
                 f"kept as it is (--restart-from {cfg.pipeline.restart_from})" if settings_differ else "skipped")
        return CheckpointInfo(key=key, uri=uri, sha256=manifest["sha256"], steps=steps, round=round_index,
                              trained=False, train_seconds=0.0, resumed_from=0)
    state = store.read_state_meta(state_key(key))
    if state is not None and lineage.difference(state.get("lineage"), want) is None:
        log.warning("%s: the checkpoint at %s was made from %s; an in-round state of this run's settings and parent "
                    "is there, so its retraining continues", label, uri, differs)
        return None
    raise PipelineMismatchError(lineage.mismatch_message(label=label, uri=uri, what=differs,
                                                         restart_from=round_index))


def _resume(store: CheckpointStore, key: str, state: TrainState, *, want: Lineage, label: str,
            is_main: bool) -> None:
    """Continue from the in-round state at ``key`` when it carries ``want``'s lineage; discard it otherwise."""
    skey = state_key(key)
    meta = store.read_state_meta(skey)
    if meta is None:
        return
    differs = lineage.difference(meta.get("lineage"), want)
    if differs is not None:
        log.warning("%s: discarding the in-round state at %s (update %s): it was made from %s; the round starts "
                    "over", label, store.uri(skey), meta.get("step"), differs)
        if is_main:
            store.clear_state(skey)
        return
    saved = store.load_state(skey)
    if saved is not None:
        tensors, meta = saved
        state.load_tensors(tensors, meta)
        log.info("resuming %s from update %d", store.uri(key), state.step)


def _state_saver(store: CheckpointStore, key: str, want: Lineage) -> Callable[[TrainState], None]:
    """The in-round checkpoint hook (the training loop calls it on rank 0 only); the state carries the lineage."""
    def save(state: TrainState) -> None:
        tensors, meta = state.to_tensors()
        store.save_state(state_key(key), tensors=tensors, meta={**meta, "lineage": want.manifest_fields()})
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


def _check_finite_student(weights: dict[str, torch.Tensor], manifest: dict, *, label: str, round_index: int,
                          device: torch.device) -> None:
    """NonFiniteOutputError (naming the round and the way out) unless the student's weights and samples are finite."""
    steps = int(manifest["steps"])
    bad, total = finite.nonfinite_weights(weights), sum(t.numel() for t in weights.values())
    what = f"{bad} of its {total} weights are non-finite"
    if not bad:
        model = model_from_tensors(weights, manifest, source=label, device=device)
        bad, total = finite.nonfinite_samples(model, steps=steps, device=device)
        what = (f"the student samples non-finite values ({bad} of {total} values, {finite.CHECK_SAMPLES} "
                f"samples at {steps} step(s), seed {finite.CHECK_SEED})")
    if bad:
        raise finite.NonFiniteOutputError(
            f"{label}: {what}; nothing was saved as complete. Lower distill.lr (or set distill.grad_clip) and rerun "
            f"with --restart-from {round_index}: it retrains this round, the rounds before it are kept")


def load_train_data(cfg: Config) -> ImageData:
    """The training split of ``cfg.data``."""
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
                           on_progress=progress, fault_at_step=fault_at_step)
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
    want = lineage.teacher_lineage(cfg, source_sha256=manifest.get("sha256"))
    new_manifest = _manifest(cfg, kind="teacher", spec=None, steps=start, round_index=0, lineage_=want,
                             schedule=manifest_schedule(manifest),
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


def run_round(cfg: Config, store: CheckpointStore, *, round_index: int, teacher: CheckpointInfo,
              data: ImageData | None = None, on_progress: ProgressCallback | None = None,
              fault_at_step: int | None = None) -> CheckpointInfo:
    """Round ``round_index``: distill the teacher (2N steps) into a student (N steps); resumable."""
    teacher_steps = teacher.steps
    student_steps = teacher_steps // 2
    key = round_key(cfg.pipeline.name, round_index=round_index, student_steps=student_steps)
    phase = round_phase(round_index=round_index, teacher_steps=teacher_steps, student_steps=student_steps)
    # ``auto`` resolves through the teacher's parameterization: the lineage records what it resolved to.
    teacher_kind = (store.read_manifest(teacher.key) or {}).get("parameterization", cfg.diffusion.parameterization)
    student_kind = student_parameterization(requested=cfg.distill.student_parameterization, teacher=teacher_kind)
    want = lineage.round_lineage(cfg, round_index=round_index, teacher_steps=teacher_steps,
                                 parent_sha256=teacher.sha256, student_parameterization=student_kind)
    found = _reusable(store, cfg, key, want=want, label=phase, steps=student_steps, round_index=round_index)
    if found is not None:
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
                           fault_at_step=fault_at_step)
    manifest = _manifest(cfg, kind="student", spec=None, steps=student_steps,
                         round_index=round_index, lineage_=want, schedule=schedule,
                         extra={"updates": updates, "teacher_steps": teacher_steps, **_timing(result),
                                **arch.without_dropout().manifest_fields(),
                                "parameterization": student_kind, "teacher_parameterization": teacher_kind})
    _check_finite_student(result.weights, manifest, label=phase, round_index=round_index, device=runtime.device)
    info = _publish(store, key, weights=result.weights, manifest=manifest, is_main=runtime.is_main)
    log.info("%s saved to %s (sha256 %s)", phase, info.uri, info.sha256[:12])
    return dataclasses.replace(info, train_seconds=result.seconds)


__all__ = ["CheckpointInfo", "PipelineMismatchError", "ensure_teacher", "import_diffusers_teacher", "import_teacher",
           "open_store", "round_key", "run_round", "state_key", "teacher_key"]
