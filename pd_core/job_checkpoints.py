"""What every job of :mod:`pd_core.jobs` does with its checkpoint in the store, whatever it trains.

Keys (``pipelines/<name>/teacher``, ``.../guided``, ``.../rounds/03-0032`` and the in-round state next
to each), the :class:`CheckpointInfo` tasks pass around, the manifest, and the lifecycle under
lineage (:mod:`pd_core.lineage`): reuse a complete checkpoint of this run's lineage
(:func:`_reusable`), continue from an in-round state of the same lineage (:func:`_resume`), save
in-round states that carry it (:func:`_state_saver`), publish the finished checkpoint (:func:`_publish`).
``pipeline.restart_from = N`` retrains what belongs to round N and later and keeps what comes before.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd_core import dist, lineage
from pd_core.config import Config
from pd_core.lineage import Lineage, PipelineMismatchError
from pd_core.schedule import Schedule
from pd_core.store import NOT_SAVED, CheckpointStore
from pd_core.train import TrainResult, TrainState, copy_weights
from pd_core.unet import UNetSpec, spec_to_dict

log = logging.getLogger("pd_core.jobs")


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
              round_index: int, restart_index: int | None = None) -> CheckpointInfo | None:
    """The stored checkpoint at ``key`` when it may be reused; None when the job must (re)train it.

    Missing: None. Corrupt: None, with a log line. Restarted (pipeline.restart_from <= round): None,
    with a log line. Complete with this lineage: reused. Complete with another lineage: None when an
    in-round state of this run's lineage shows a retraining in progress, else PipelineMismatchError.
    ``restart_index`` (default ``round_index``): the ``--restart-from`` number that retrains it (1 for
    guided distillation's stage 1, whose manifest says round 0).
    """
    restart_index = round_index if restart_index is None else restart_index
    uri = store.uri(key)
    problem = store.problem(key)
    if problem == NOT_SAVED:
        return None
    if problem is not None:
        log.warning("%s: the checkpoint at %s is corrupt (%s); retraining it", label, uri, problem)
        return None
    manifest = store.read_manifest(key) or {}
    if _restarting(cfg, restart_index):
        log.warning("%s: retraining it (--restart-from %d); the checkpoint at %s (sha256 %s) is replaced when the "
                    "new one is saved", label, cfg.pipeline.restart_from, uri, str(manifest.get("sha256"))[:12])
        return None
    kept = _kept_as_is(cfg, restart_index)
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
                                                         restart_from=restart_index))


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


__all__ = ["CheckpointInfo", "guided_key", "open_store", "pipeline_prefix", "round_key", "round_phase", "state_key",
           "teacher_key"]
