"""Prefect tasks that measure samplers: the teacher's baselines and each round's distilled student.

Records are cached in the store by the weights' sha256, so reruns re-measure nothing; metrics go
to the matching MLflow child run under the same names for every round. A metric measured at several
step counts in one run is logged twice: as a series with step = the number of sampling steps (the
charts), and once per step count under its own key, ``<name>_<N>steps`` (MLflow's run overview and
Compare page show only a series' last value, so only per-step keys show every step count there).
Each model's display grid (pd_core.evaluation.write_grid) goes to its run's ``samples/`` artifacts.
A class-conditional model is measured at each of its guidance weights (``evaluation.evaluation_weights``);
its metric names then end in ``_w<w>`` (``fd_fashion_mnist_w2``, ``sample_accuracy_w2``) and its grids are
tagged ``sample_grid_w<w>``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from prefect import get_run_logger, task

from pd_core import evaluation, text_evaluation
from pd_core.config import Config
from pd_core.jobs import CheckpointInfo
from pd_core.text_to_image import is_text_pipeline
from pd_core.train import resolve_runtime
from tasks.common import open_store, tracker_for
from tasks.training import GPU_TASK

METRIC_META = ("sampler", "steps", "gamma", "w", "model_sha256", "model_uri")


def numeric_metrics(record: dict) -> dict[str, float]:
    """The numbers of a record (what MLflow gets); a record at a guidance weight w names them ``<metric>_w<w>``."""
    w = record.get("w")
    suffix = "" if w is None else f"_w{float(w):g}"
    return {f"{k}{suffix}": float(v) for k, v in record.items()
            if k not in METRIC_META and isinstance(v, (int, float)) and not isinstance(v, bool)}


def is_headline(name: str) -> bool:
    """FD / FID / KID keys (with any sampler prefix), not their standard deviations: what per-step keys carry."""
    return not name.endswith("_std") and ("fd_" in name or name.endswith("fid") or "kid_" in name)


def per_step_keys(metrics: dict[str, float], *, steps: int) -> dict[str, float]:
    """``{"distilled_fd_digits": 12.7}`` at 4 steps -> ``{"distilled_fd_digits_4steps": 12.7}`` (headline keys only)."""
    return {f"{k}_{steps}steps": v for k, v in metrics.items() if is_headline(k)}


def grid_artifact_path(grid_uri: str) -> str:
    """Where a display grid sits among its run's artifacts: ``samples-ddim.png`` (``samples-ddim-w1.png`` at a
    guidance weight), the same name in every round's run and at the artifact root, since MLflow's Compare page
    shows side by side the top-level files the runs have in common. The step count is in the run and in the
    grid's caption."""
    name = grid_uri.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"^samples-([a-z_]+)-\d{4}", r"samples-\1", name)


def _grid_tag(w: float | None) -> str:
    return "sample_grid" if w is None else f"sample_grid_w{w:g}"


@task(name="evaluate-teacher", task_run_name="eval-teacher", **GPU_TASK)
def evaluate_teacher_task(cfg: Config, *, teacher: CheckpointInfo) -> list[dict]:
    """Teacher DDIM and stochastic (every gamma) at each step count of the chain, plus the real-vs-real floor."""
    if not cfg.eval.enabled:
        return []
    if is_text_pipeline(cfg):
        return _evaluate_text_teacher(cfg, teacher=teacher)
    logger = get_run_logger()
    store, device = open_store(cfg), resolve_runtime(cfg.runtime).device
    ctx = evaluation.feature_context(cfg, store, device=device)
    accuracy = ctx.extractor.manifest.get("test_accuracy") if hasattr(ctx.extractor, "manifest") else None
    if accuracy is not None:
        logger.info("feature classifier test accuracy %.4f (%s)", accuracy, ctx.extractor.fd_name)
    records = [evaluation.floor_record(cfg, store, ctx)]
    tracker = tracker_for(cfg)
    run_id = teacher.mlflow_run_id
    for w in evaluation.evaluation_weights(cfg, store.read_manifest(teacher.key)):
        for steps in evaluation.teacher_step_counts(cfg):
            ddim = evaluation.evaluate_checkpoint(cfg, store, ctx, key=teacher.key, label="teacher_ddim",
                                                  sampler="ddim", steps=steps, device=device, w=w)
            records.append(ddim)
            ddim_metrics = {f"ddim_{k}": v for k, v in numeric_metrics(ddim).items()}
            tracker.log_metrics(run_id, ddim_metrics, step=steps)
            tracker.log_metrics(run_id, per_step_keys(ddim_metrics, steps=steps))
            stochastic = [evaluation.evaluate_checkpoint(cfg, store, ctx, key=teacher.key,
                                                         label="teacher_stochastic", sampler="stochastic",
                                                         steps=steps, gamma=g, device=device, w=w)
                          for g in cfg.eval.stochastic_gammas]
            records += stochastic
            fd = ctx.extractor.fd_name
            best = min(stochastic, key=lambda r: r[fd], default=None)
            if best is not None:
                best_metrics = {f"stochastic_{k}": v for k, v in numeric_metrics(best).items()}
                tracker.log_metrics(run_id, best_metrics, step=steps)
                tracker.log_metrics(run_id, per_step_keys(best_metrics, steps=steps))
        grid = evaluation.write_grid(cfg, store, key=teacher.key, sampler="ddim", steps=cfg.distill.start_steps,
                                     device=device, w=w)
        tracker.set_tags(run_id, {_grid_tag(w): grid})
        _log_grid(tracker, run_id, store, grid_uri=grid)
    tracker.flush()
    return records


@task(name="evaluate-round", **GPU_TASK)
def evaluate_round_task(cfg: Config, *, student: CheckpointInfo) -> list[dict]:
    """The distilled student with its own N-step DDIM sampler, at each of its guidance weights (one record when
    unconditional); metrics and sample grids to its MLflow run. Records carry their ``sample_grid``."""
    if not cfg.eval.enabled:
        return []
    if is_text_pipeline(cfg):
        return _evaluate_text_student(cfg, student=student)
    store, device = open_store(cfg), resolve_runtime(cfg.runtime).device
    ctx = evaluation.feature_context(cfg, store, device=device)
    tracker = tracker_for(cfg)
    run_id = student.mlflow_run_id
    records = []
    for w in evaluation.evaluation_weights(cfg, store.read_manifest(student.key)):
        record = evaluation.evaluate_checkpoint(cfg, store, ctx, key=student.key, label="distilled", sampler="ddim",
                                                steps=student.steps, device=device, w=w)
        grid = evaluation.write_grid(cfg, store, key=student.key, sampler="ddim", steps=student.steps,
                                     device=device, w=w)
        tracker.log_metrics(run_id, numeric_metrics(record))
        tracker.set_tags(run_id, {_grid_tag(w): grid})
        _log_grid(tracker, run_id, store, grid_uri=grid)
        records.append({**record, "sample_grid": grid})
    tracker.flush()
    return records


def _log_grid(tracker, run_id: str | None, store, *, grid_uri: str) -> None:
    """Copy the grid PNG into the MLflow run's artifacts at :func:`grid_artifact_path` (MLflow wants a local file)."""
    key = grid_uri[len(store.uri("")):].lstrip("/") if grid_uri.startswith(store.uri("")) else None
    if key is None or run_id is None:
        return
    artifact = grid_artifact_path(grid_uri)
    folder, _, name = artifact.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(store.get_bytes(key))
        tracker.log_artifact(run_id, str(path), artifact_path=folder or None)




def _evaluate_text_teacher(cfg: Config, *, teacher: CheckpointInfo) -> list[dict]:
    """A text-to-image teacher per w and step count of the chain: our guided DDIM (``ddim_`` metrics) and stock
    StableDiffusionPipeline with the folder's scheduler settings (``diffusers_ddim_``), plus the floor."""
    store, device = open_store(cfg), resolve_runtime(cfg.runtime).device
    ctx = text_evaluation.text_feature_context(cfg, store, device=device)
    records = [evaluation.floor_record(cfg, store, ctx)]
    tracker, run_id = tracker_for(cfg), teacher.mlflow_run_id
    for w in text_evaluation.text_evaluation_weights(cfg, store.read_manifest(teacher.key) or {}):
        for steps in evaluation.teacher_step_counts(cfg):
            for kind, prefix in (("teacher_ddim", "ddim"), ("diffusers_ddim", "diffusers_ddim")):
                record = text_evaluation.evaluate_text_checkpoint(cfg, store, ctx, key=teacher.key, kind=kind,
                                                                  steps=steps, w=w, device=device)
                records.append(record)
                metrics = {f"{prefix}_{k}": v for k, v in numeric_metrics(record).items()}
                tracker.log_metrics(run_id, metrics, step=steps)
                tracker.log_metrics(run_id, per_step_keys(metrics, steps=steps))
        if cfg.eval.grid_size:
            grid = text_evaluation.write_text_grid(cfg, store, key=teacher.key, steps=cfg.distill.start_steps, w=w,
                                                   device=device)
            tracker.set_tags(run_id, {_grid_tag(w): grid})
            _log_grid(tracker, run_id, store, grid_uri=grid)
    tracker.flush()
    return records


def _evaluate_text_student(cfg: Config, *, student: CheckpointInfo) -> list[dict]:
    """A text-to-image student with its own N-step DDIM at each of its weights; metrics and grids to its run."""
    store, device = open_store(cfg), resolve_runtime(cfg.runtime).device
    ctx = text_evaluation.text_feature_context(cfg, store, device=device)
    tracker, run_id = tracker_for(cfg), student.mlflow_run_id
    records = []
    for w in text_evaluation.text_evaluation_weights(cfg, store.read_manifest(student.key) or {}):
        record = text_evaluation.evaluate_text_checkpoint(cfg, store, ctx, key=student.key, kind="distilled",
                                                          steps=student.steps, w=w, device=device)
        grid = None
        if cfg.eval.grid_size:
            grid = text_evaluation.write_text_grid(cfg, store, key=student.key, steps=student.steps, w=w,
                                                   device=device)
            tracker.set_tags(run_id, {_grid_tag(w): grid})
            _log_grid(tracker, run_id, store, grid_uri=grid)
        tracker.log_metrics(run_id, numeric_metrics(record))
        records.append({**record, "sample_grid": grid} if grid else record)
    tracker.flush()
    return records
