"""Part 2 of the GPU run: the fmnist-gpu pipeline (teacher, every round, evaluation) through pd_core's jobs.

The code paths of the Prefect tasks (tasks/training.py, tasks/evaluate.py), in the order of
flows/pipeline.py, without Prefect or MLflow: ``jobs.ensure_teacher``; the teacher's baselines
(the real-vs-real floor, DDIM and the stochastic sampler at every gamma at every N of the chain, the
sample grid); per round ``jobs.run_round`` and the student's N-step DDIM evaluation and grid. Then
the end points -- the teacher at its start steps, the 4- and 1-step students -- and the floor again
at a larger N (``large_cfg``: the same config with eval.num_samples = that N).

A budget bounds the part: when it is spent, the next progress report raises :class:`PartTimeout`
(training reports every ``log_every`` updates, evaluation after every batch). Checkpoints and
records stay in the store, so a rerun over the same store resumes and re-measures nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from benchmarks.speed.gpu_bench import Budget
from pd_core import evaluation, jobs
from pd_core.config import Config
from pd_core.evaluation import FeatureContext
from pd_core.jobs import CheckpointInfo
from pd_core.metrics import ClassifierFeatures, quality_long
from pd_core.store import CheckpointStore
from pd_core.train import ProgressEvent, resolve_runtime

log = logging.getLogger("benchmarks.gpu")

COLUMNS = ["preset", "sampler", "steps", "metric", "value", "n_samples", "seconds_per_image"]
FLOOR = "real_data_floor"  # the sampler column of the real-vs-real floor rows
SAMPLER_ORDER = {"teacher_ddim": 0, "teacher_stochastic": 1, "distilled": 2, FLOOR: 3}
GRID_STEPS = (1, 2, 4, 8)  # the teacher's grids at these N, next to the students' (samples.png)


class PartTimeout(RuntimeError):
    """A part of the GPU run used up its time budget; what it finished is kept."""


def end_points(cfg: Config) -> list[tuple[str, int]]:
    """(sampler label, steps) measured again at the larger N: the teacher at its start steps, the 4-step student
    (when the chain has one) and the last student."""
    students = [s for _, s in cfg.distill.rounds()]
    points = [("teacher_ddim", cfg.distill.start_steps)]
    points += [("distilled", s) for s in sorted({4, cfg.distill.final_steps} & set(students), reverse=True)]
    return points


def training_watchdog(budget: Budget, *, part: str) -> Callable[[ProgressEvent], None]:
    """A training progress callback that raises :class:`PartTimeout` once ``budget`` is spent."""
    def check(event: ProgressEvent) -> None:
        if budget.left() < 0:
            raise PartTimeout(f"{part}: time budget of {budget.seconds:.0f} s spent during {event.phase} at update "
                              f"{event.step}/{event.total}")
    return check


def evaluation_watchdog(budget: Budget, *, part: str, what: str) -> Callable[[int, int], None]:
    """An evaluation progress callback (done, total) that raises :class:`PartTimeout` once ``budget`` is spent."""
    def check(done: int, total: int) -> None:
        if budget.left() < 0:
            raise PartTimeout(f"{part}: time budget of {budget.seconds:.0f} s spent while evaluating {what} "
                              f"({done}/{total} samples)")
    return check


@dataclass
class QualityRun:
    """What the part produced so far (filled in as it goes, so a timeout still leaves the finished parts)."""

    records: list[dict] = field(default_factory=list)  # at eval.num_samples, floor included
    large_records: list[dict] = field(default_factory=list)  # at the larger N, floor included
    chain: dict[int, CheckpointInfo] = field(default_factory=dict)  # steps -> checkpoint (teacher at start steps)
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    classifier: dict = field(default_factory=dict)  # the feature network: sha256, test accuracy


@contextmanager
def _phase(run: QualityRun, name: str) -> Iterator[None]:
    """Adds the wall seconds of the block to ``run.seconds[name]`` (also when it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        run.seconds[name] = round(run.seconds.get(name, 0.0) + time.perf_counter() - t0, 2)


def _teacher_baselines(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *, teacher: CheckpointInfo,
                       device: torch.device, budget: Budget, into: list[dict]) -> None:
    """What ``evaluate_teacher_task`` measures, appended to ``into`` as each finishes: the floor, DDIM and every
    gamma at each N, then the start-steps grid."""
    into.append(evaluation.floor_record(cfg, store, ctx))
    for steps in evaluation.teacher_step_counts(cfg):
        for sampler, gamma in [("ddim", None)] + [("stochastic", g) for g in cfg.eval.stochastic_gammas]:
            label = "teacher_ddim" if sampler == "ddim" else "teacher_stochastic"
            watch = evaluation_watchdog(budget, part="quality", what=f"{label} {steps} steps")
            into.append(evaluation.evaluate_checkpoint(cfg, store, ctx, key=teacher.key, label=label, sampler=sampler,
                                                       steps=steps, gamma=gamma, device=device, progress=watch))
    evaluation.write_grid(cfg, store, key=teacher.key, sampler="ddim", steps=cfg.distill.start_steps, device=device)


def run_pipeline(cfg: Config, large_cfg: Config, store: CheckpointStore, *, budget: Budget,
                 run: QualityRun) -> QualityRun:
    """Teacher, baselines, every round with its evaluation, then the end points at the larger N; fills ``run``."""
    device = resolve_runtime(cfg.runtime).device
    watch = training_watchdog(budget, part="quality")

    def evaluate(c: Config, info: CheckpointInfo, label: str) -> dict:
        what = f"{label} {info.steps} steps at N={c.eval.num_samples}"
        return evaluation.evaluate_checkpoint(c, store, ctx, key=info.key, label=label, sampler="ddim",
                                              steps=info.steps, device=device,
                                              progress=evaluation_watchdog(budget, part="quality", what=what))

    with _phase(run, "data"):
        data = jobs.load_train_data(cfg)
    with _phase(run, "teacher"):
        teacher = jobs.ensure_teacher(cfg, store, data=data, on_progress=watch)
    run.chain[teacher.steps] = teacher
    with _phase(run, "features"):
        ctx = evaluation.feature_context(cfg, store, device=device)
    run.classifier = {"sha256": ctx.extractor_id, "test_accuracy": ctx.extractor.test_accuracy
                      if isinstance(ctx.extractor, ClassifierFeatures) else None}
    with _phase(run, "teacher_eval"):
        _teacher_baselines(cfg, store, ctx, teacher=teacher, device=device, budget=budget, into=run.records)
    for round_index, (_, student_steps) in enumerate(cfg.distill.rounds(), start=1):
        with _phase(run, "rounds"):
            student = jobs.run_round(cfg, store, round_index=round_index, teacher=run.chain[2 * student_steps],
                                     data=data, on_progress=watch)
        run.chain[student.steps] = student
        with _phase(run, "round_eval"):
            run.records.append(evaluate(cfg, student, "distilled"))
            evaluation.write_grid(cfg, store, key=student.key, sampler="ddim", steps=student.steps, device=device)
    with _phase(run, "end_points"):
        run.large_records.append(evaluation.floor_record(large_cfg, store, ctx))
        for label, steps in end_points(cfg):
            run.large_records.append(evaluate(large_cfg, run.chain[steps], label))
    with _phase(run, "grids"):  # the teacher's N-step grids next to the students' (grid_size^2 images each)
        for n in GRID_STEPS:
            evaluation.write_grid(cfg, store, key=teacher.key, sampler="ddim", steps=n, device=device)
    return run


def quality_rows(records: list[dict], *, preset: str) -> pd.DataFrame:
    """Long rows of one N in the repository's format (best gamma per N; the floor as sampler ``real_data_floor``)."""
    if not records:
        return pd.DataFrame(columns=COLUMNS)
    long = quality_long(records)
    is_floor = long["sampler"] == "floor"
    long.loc[is_floor, "sampler"] = FLOOR
    long.loc[is_floor, "seconds_per_image"] = math.nan  # no sampler: nothing was sampled
    long.insert(0, "preset", preset)
    return long[COLUMNS]


def results_frame(run: QualityRun, *, preset: str) -> pd.DataFrame:
    """Every row of the part: the pipeline's N, then the larger N; sampler order, steps, metric within each."""
    df = pd.concat([quality_rows(run.records, preset=preset), quality_rows(run.large_records, preset=preset)],
                   ignore_index=True)
    if df.empty:
        return df
    df = df.astype({"steps": "Int64", "n_samples": "Int64"})
    order = df["sampler"].map(SAMPLER_ORDER).fillna(len(SAMPLER_ORDER))
    df = df.assign(_order=order).sort_values(["n_samples", "_order", "steps", "metric"], na_position="last")
    return df.drop(columns="_order").reset_index(drop=True)
