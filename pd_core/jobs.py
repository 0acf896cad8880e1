"""The units of work of a pipeline, over the checkpoint store: teacher, distillation round, model loading.

Each job is idempotent and resumable: a complete, verified checkpoint at its key means "done"
(skipped); an in-round state next to it means "continue from there". Prefect tasks and the CLI
call these; nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import functools
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pd_core import config as config_mod
from pd_core.data import BatchSampler, ImageData, load_split
from pd_core.denoiser import Denoiser
from pd_core.store import CheckpointStore, StoreError
from pd_core.train import (ProgressCallback, TrainState, copy_weights, distill_round, frozen_teacher,
                           new_student_state, new_teacher_state, resolve_runtime, spec_from_dict, spec_to_dict,
                           train_teacher, unet_spec)
from pd_core.unet import UNet, UNetSpec

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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def training_hash(cfg: Any) -> str:
    """Hash of the settings that decide the weights (not evaluation/storage/tracking)."""
    return config_mod.config_hash(cfg, sections=TRAINING_SECTIONS)


def pipeline_prefix(name: str) -> str:
    return f"pipelines/{name}"


def teacher_key(name: str) -> str:
    return f"{pipeline_prefix(name)}/teacher"


def round_key(name: str, *, round_index: int, student_steps: int) -> str:
    """``pipelines/<name>/rounds/03-0032``: round 3 trains the 32-step student."""
    return f"{pipeline_prefix(name)}/rounds/{round_index:02d}-{student_steps:04d}"


def state_key(key: str) -> str:
    """Where a checkpoint's in-progress training state lives."""
    return f"{key}.state"


def round_phase(*, round_index: int, teacher_steps: int, student_steps: int) -> str:
    return f"round {round_index} ({teacher_steps}->{student_steps})"


def open_store(cfg: Any) -> CheckpointStore:
    return CheckpointStore(cfg.storage.root, storage_options=dict(cfg.storage.storage_options))


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p/pipelines/x/teacher`` -> (``s3://b/p/pipelines/x``, ``teacher``)."""
    uri = uri.rstrip("/")
    root, key = posixpath.split(uri)
    if not key or not root:
        raise ValueError(f"checkpoint URI {uri!r} must name a checkpoint folder, e.g. file:///runs/store/pipelines/x/teacher")
    return root, key


@functools.lru_cache(maxsize=16)
def _state_shapes(spec: UNetSpec) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of UNet(spec) (cached: an evaluation checks every checkpoint it loads)."""
    with torch.device("meta"):  # shapes only: nothing allocated, nothing drawn from the RNG
        return {k: tuple(v.shape) for k, v in UNet(spec).state_dict().items()}


def check_weights_fit(tensors: dict, spec: UNetSpec, *, source: str) -> None:
    """StoreError (one line, naming the first misfit) unless ``tensors`` are exactly the state dict of UNet(spec)."""
    want = _state_shapes(spec)
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    wrong = [k for k in want if k in have and have[k] != want[k]]
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if not (wrong or missing or extra):
        return
    if wrong:
        first = f"{wrong[0]} has shape {list(have[wrong[0]])}, the architecture needs {list(want[wrong[0]])}"
    else:
        first = f"{missing[0]} is missing" if missing else f"{extra[0]} is not part of the architecture"
    raise StoreError(f"{source}: weights do not fit the architecture in its manifest ({first}; "
                     f"{len(wrong) + len(missing) + len(extra)} tensor(s) differ); the checkpoint or its manifest was "
                     f"altered - re-export it or point at the right checkpoint")


def _model_spec(cfg: Any, data: ImageData) -> UNetSpec:
    return unet_spec(cfg.model, in_channels=data.images.shape[1], image_size=data.images.shape[-1],
                     parameterization=cfg.diffusion.parameterization, num_classes=data.num_classes,
                     dropout=cfg.model.dropout)


def _manifest(cfg: Any, *, kind: str, spec: UNetSpec, steps: int, round_index: int, parent_sha256: str | None,
              extra: dict | None = None) -> dict:
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
        **(extra or {}),
    }


def _timing(result: Any) -> dict[str, Any]:
    """Training wall time for the manifest (the finishing invocation's; resumed_from > 0 says earlier work is not in it)."""
    return {"train_seconds": round(float(result.seconds), 1), "resumed_from": int(result.resumed_from)}


def _check_same_training(cfg: Any, manifest: dict, *, uri: str) -> None:
    have, want = manifest.get("config_hash"), training_hash(cfg)
    if have != want:
        raise PipelineMismatchError(
            f"{uri} was trained with different settings (config hash {have} != {want}); "
            f"use another pipeline name (--name) or a fresh storage root")


def _existing(store: CheckpointStore, cfg: Any, key: str, *, steps: int, round_index: int) -> CheckpointInfo | None:
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
    def save(state: TrainState) -> None:
        tensors, meta = state.to_tensors()
        store.save_state(state_key(key), tensors=tensors, meta=meta)
    return save


def load_train_data(cfg: Any) -> ImageData:
    return load_split(cfg.data, split="train")


def sampler_for(cfg: Any, data: ImageData, *, seed: int) -> BatchSampler:
    return BatchSampler(data, batch_size=cfg.distill.batch_size, seed=seed, random_flip=cfg.data.random_flip)


def ensure_teacher(cfg: Any, store: CheckpointStore, *, data: ImageData | None = None,
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
    ref = store.save_checkpoint(key, tensors=copy_weights(result.weights),
                                manifest=_manifest(cfg, kind="teacher", spec=spec, steps=start, round_index=0,
                                                   parent_sha256=None,
                                                   extra={"updates": result.steps, **_timing(result)}))
    store.clear_state(state_key(key))
    log.info("teacher saved to %s (sha256 %s)", ref.uri, ref.sha256[:12])
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=True,
                          train_seconds=result.seconds, resumed_from=result.resumed_from)


def import_teacher(cfg: Any, store: CheckpointStore, *, uri: str) -> CheckpointInfo:
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
    ref = store.save_checkpoint(key, tensors=tensors,
                                manifest=_manifest(cfg, kind="teacher", spec=spec, steps=start, round_index=0,
                                                   parent_sha256=manifest.get("sha256"),
                                                   extra={"imported_from": uri}))
    log.info("teacher imported from %s to %s", uri, ref.uri)
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=False,
                          train_seconds=0.0, resumed_from=0)


def run_round(cfg: Any, store: CheckpointStore, *, round_index: int, teacher: CheckpointInfo,
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
    teacher_weights, teacher_manifest = store.load_checkpoint(teacher.key)
    if teacher_manifest["sha256"] != teacher.sha256:
        raise StoreError(f"{teacher.uri} changed since it was produced (sha256 {teacher_manifest['sha256'][:12]} != "
                         f"{teacher.sha256[:12]}); rerun the pipeline")
    spec = spec_from_dict(teacher_manifest["unet"])
    check_weights_fit(teacher_weights, spec, source=teacher.uri)
    seed = cfg.pipeline.seed + 1000 * round_index  # each round sees its own noise and batches
    # Student dropout draws from torch's global RNG: seed it per round, so the masks do not depend on what
    # this process ran before (a rerun that skips the teacher would otherwise draw other masks).
    torch.manual_seed(seed)
    state = new_student_state(teacher_weights=teacher_weights, spec=spec, distill_cfg=cfg.distill, runtime=runtime,
                              seed=seed)
    # Build every network BEFORE resuming: a network's init draws from the global RNG, which _resume restores.
    teacher_net = frozen_teacher(weights=teacher_weights, spec=spec, parameterization=cfg.diffusion.parameterization,
                                 runtime=runtime)
    _resume(store, key, state)
    updates = cfg.distill.updates_for(student_steps)
    phase = round_phase(round_index=round_index, teacher_steps=teacher_steps, student_steps=student_steps)
    result = distill_round(state=state, teacher_net=teacher_net, student_steps=student_steps, updates=updates,
                           phase=phase, distill_cfg=cfg.distill, diffusion_cfg=cfg.diffusion, runtime=runtime,
                           sample_batch=sampler_for(cfg, data, seed=seed).batch,
                           on_checkpoint=_state_saver(store, key), on_progress=on_progress,
                           fault_at_step=fault_at_step)
    student_spec = UNetSpec(**{**spec_to_dict(spec), "dropout": 0.0})
    ref = store.save_checkpoint(key, tensors=copy_weights(result.weights),
                                manifest=_manifest(cfg, kind="student", spec=student_spec, steps=student_steps,
                                                   round_index=round_index, parent_sha256=teacher.sha256,
                                                   extra={"updates": updates, "teacher_steps": teacher_steps,
                                                          **_timing(result)}))
    store.clear_state(state_key(key))
    log.info("%s saved to %s (sha256 %s)", phase, ref.uri, ref.sha256[:12])
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=student_steps, round=round_index,
                          trained=True, train_seconds=result.seconds, resumed_from=result.resumed_from)


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint made ready to sample: the denoiser plus what the manifest says about it."""

    denoiser: Denoiser
    manifest: dict
    steps: int
    logsnr_min: float
    logsnr_max: float


def model_from_tensors(tensors: dict, manifest: dict, *, source: str, device: torch.device | str = "cpu") -> LoadedModel:
    """An eval-mode U-Net built from the manifest's architecture, loaded with ``tensors`` (strict)."""
    spec = UNetSpec(**{**spec_to_dict(spec_from_dict(manifest["unet"])), "dropout": 0.0})
    check_weights_fit(tensors, spec, source=source)
    net: nn.Module = UNet(spec)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise StoreError(f"{source}: weights do not fit the architecture in its manifest ({first})") from err
    net = net.to(device).eval().requires_grad_(False)
    return LoadedModel(denoiser=Denoiser(net, parameterization=manifest["parameterization"]), manifest=manifest,
                       steps=int(manifest["steps"]), logsnr_min=float(manifest.get("logsnr_min", -20.0)),
                       logsnr_max=float(manifest.get("logsnr_max", 20.0)))


def load_model(store: CheckpointStore, key: str, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a verified checkpoint into an eval-mode network wrapped as a Denoiser."""
    tensors, manifest = store.load_checkpoint(key)
    return model_from_tensors(tensors, manifest, source=store.uri(key), device=device)


def model_from_files(*, weights_path: str, manifest: dict, device: torch.device | str = "cpu") -> LoadedModel:
    """A model from a local safetensors file and its manifest (e.g. downloaded from MLflow); never unpickles."""
    from safetensors.torch import load_file

    return model_from_tensors(load_file(weights_path), manifest, source=weights_path, device=device)


def load_model_uri(uri: str, *, storage_options: dict | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """:func:`load_model` from a checkpoint folder URI such as ``file:///.../rounds/03-0032``."""
    root, key = split_uri(uri)
    return load_model(CheckpointStore(root, storage_options=storage_options), key, device=device)


__all__ = ["CheckpointInfo", "LoadedModel", "PipelineMismatchError", "ensure_teacher", "import_teacher",
           "load_model", "load_model_uri", "open_store", "round_key", "run_round", "teacher_key", "training_hash"]
