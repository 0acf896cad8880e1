"""The sweep flow: a preset plus a grid of overrides as one parent flow run whose children are the pipelines.

    sweep -> point 1 (trains teacher A) -> point 2 (shares A) -> point 3 (trains teacher B) -> ... -> comparison

Each grid point (:mod:`flows.sweep_grid`) is one ``progressive-distillation`` pipeline named after what it
changes. Points whose teachers have the same lineage (:func:`pd_core.lineage.teacher_lineage`: the same
settings hash, trained here) share one: the first of them trains it in its own pipeline folder, the
others use it where it is (:func:`pd_core.jobs.shared_teacher`; no copy). A point that imports its
teacher (``pipeline.teacher_uri``) shares nothing.

- On the embedded server the points run in this process as subflows, one after another, in grid order
  (a teacher's first point always comes before the points that share it).
- On a standing server (or with ``points_as="deployments"``) they run as runs of the ``pd-distill``
  deployment on the work pool, whose ``gpu`` concurrency limit holds them to the GPUs: first every
  point that trains a teacher, at once, then every other point, at once.

Every child flow run is tagged ``sweep:<name>`` and ``sweep-run:<parent id>``. On a standing server, when
the parent is cancelled, crashes or fails, :func:`cancel_children` ends the children still going:
deployment runs are set Cancelling (their worker stops them), others Cancelled. On the embedded server
the children run in the process: Ctrl-C crashes the running point and no later point starts (a rerun
continues it from its in-round state). A rerun reruns nothing complete:
every pipeline skips its complete checkpoints and cached evaluations. A point that fails does not stop
the others; the sweep publishes the comparison of what finished, then fails naming the failed points.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from prefect import Flow, State, flow, get_client, get_run_logger
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Cancelling

from flows.identity import PresetName, current_flow_run_id, run_name
from flows.pipeline import distillation_pipeline
from flows.sweep_grid import SweepPoint, check_sweep_name, grid_points, merge_grids, teacher_leaders
from pd_core.config import Config
from pd_core.jobs import teacher_key
from tasks.common import resolve_config, tracker_for
from tasks.prefect_server import is_embedded
from tasks.reconcile import FLOW_RUN_TAG
from tasks.results import PipelineResult
from tasks.sweep_report import SweepReport, publish_sweep_task
from tasks.tracking.sweeps import SWEEP_KIND, SWEEP_TAG, point_tags

log = logging.getLogger(__name__)

PIPELINE_DEPLOYMENT = "progressive-distillation/pd-distill"
WAIT_S = 14 * 24 * 3600  # the longest a sweep waits for its deployment runs
POLL_S = 10
_ACTIVE = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED")


class SweepFailedError(RuntimeError):
    """Some points of a sweep did not complete (the others did, and were compared)."""


@dataclass(frozen=True)
class SweepResult:
    """What the sweep returns: per point, whether it trained anything, and the comparison."""

    sweep: str
    teachers: dict[str, str]  # point -> the point whose pipeline holds its teacher (itself for a leader)
    trained: dict[str, int]  # point -> checkpoints trained in this run (0: everything reused)
    report: SweepReport | None = None
    failed: list[str] = field(default_factory=list)


def sweep_run_name() -> str:
    """Prefect's ``flow_run_name`` of a sweep: ``<name>-sweep-2026-12-07T21-20``."""
    params = dict(flow_run.parameters or {})
    return run_name({"name": params.get("name") or "sweep"}, suffix="-sweep")


def point_configs(*, preset: str, config_path: str | None, overrides: list[str], points: list[SweepPoint],
                  storage: str | None, tracking_uri: str | None) -> dict[str, Config]:
    """Every point's resolved config (a bad field or value: ConfigError naming it, before anything runs)."""
    return {p.name: resolve_config(preset=preset, config_path=config_path, overrides=[*overrides, *p.overrides()],
                                   name=p.name, storage=storage, tracking_uri=tracking_uri) for p in points}


def cancel_children(parent_id: str, *, client=None) -> list[str]:
    """End the still-active child flow runs of sweep run ``parent_id`` (tag ``sweep-run:<id>``): deployment
    runs Cancelling (the worker stops them), others Cancelled. Their ids."""
    active = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType[s] for s in _ACTIVE]))
    wanted = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"sweep-run:{parent_id}"]), state=active)
    ended = []
    with (client or get_client(sync_client=True)) as api:
        for run in api.read_flow_runs(flow_run_filter=wanted, limit=200):
            state = Cancelling() if run.deployment_id else Cancelled(message=f"sweep run {parent_id} ended")
            api.set_flow_run_state(run.id, state, force=True)
            ended.append(str(run.id))
    return ended


def _cancel_children_hook(_flow: Flow, run: FlowRun, _state: State) -> None:
    """Flow hook on cancellation, crash or failure: end the children still going.

    Not on the embedded server: its children run in this process and end with it (Prefect marks the one
    running Crashed), and after Ctrl-C the server itself is gone, so asking it would only wait out retries.
    """
    if is_embedded(get_current_settings().api.url):
        return
    try:
        ended = cancel_children(str(run.id))
    except Exception as err:  # noqa: BLE001 - the API is gone with the process: nothing left to cancel there
        log.warning("sweep: could not cancel the child runs of %s: %s", run.id, err)
        return
    if ended:
        log.warning("sweep: cancelled %d child run(s) of %s", len(ended), run.id)


def _in_process(points: list[SweepPoint], leaders: dict[str, str], common: dict, base: list[str],
                sweep: str) -> dict[str, object]:
    """Run the points here, one after another: {point: its PipelineResult, or the exception it failed with}."""
    outcomes: dict[str, object] = {}
    for point in points:
        leader = leaders[point.name]
        if leader != point.name and not isinstance(outcomes.get(leader), PipelineResult):
            outcomes[point.name] = RuntimeError(f"its teacher's point {leader} did not complete")
            continue
        state = distillation_pipeline(**common, overrides=[*base, *point.overrides()],
                                      name=point.name, sweep=point_tags(sweep, point.values),
                                      shared_teacher=teacher_key(leader) if leader != point.name else None,
                                      return_state=True)
        outcomes[point.name] = state.result(raise_on_failure=False)
    return outcomes


def _wait(run_ids: dict[str, object], *, logger) -> dict[str, object]:
    """Poll the deployment runs until each is final (at most WAIT_S): {point: True, or why it did not complete}."""
    outcomes: dict[str, object] = {}
    deadline = time.monotonic() + WAIT_S
    with get_client(sync_client=True) as api:
        while len(outcomes) < len(run_ids):
            for name, run_id in run_ids.items():
                if name in outcomes:
                    continue
                run = api.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    outcomes[name] = True if run.state.is_completed() else \
                        RuntimeError(f"deployment run {run.name} ended {run.state.name}")
                    logger.info("sweep point %s: %s", name, run.state.name)
            if len(outcomes) < len(run_ids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sweep points still running after {WAIT_S // 3600} h: "
                                       f"{', '.join(n for n in run_ids if n not in outcomes)}")
                time.sleep(POLL_S)
    return outcomes


def _as_deployments(points: list[SweepPoint], leaders: dict[str, str], common: dict, base: list[str], sweep: str,
                    deployment: str, *, logger) -> dict[str, object]:
    """Run the points as deployment runs, teacher-training points first: {point: True, or why it failed}."""
    params = {k: v for k, v in common.items() if v is not None}
    parent_id = current_flow_run_id()
    outcomes: dict[str, object] = {}
    for wave in ([p for p in points if leaders[p.name] == p.name], [p for p in points if leaders[p.name] != p.name]):
        started = {}
        for point in wave:
            leader = leaders[point.name]
            if leader != point.name and outcomes.get(leader) is not True:
                outcomes[point.name] = RuntimeError(f"its teacher's point {leader} did not complete")
                continue
            run = run_deployment(
                deployment, timeout=0, as_subflow=True, tags=[f"sweep:{sweep}", f"sweep-run:{parent_id}"],
                idempotency_key=f"{parent_id}:{point.name}",  # a retried sweep run starts no second copy
                parameters={**params, "overrides": [*base, *point.overrides()], "name": point.name,
                            "sweep": point_tags(sweep, point.values),
                            "shared_teacher": teacher_key(leader) if leader != point.name else None})
            started[point.name] = run.id
        outcomes.update(_wait(started, logger=logger))
    return outcomes


@flow(name="pd-sweep", flow_run_name=sweep_run_name, on_cancellation=[_cancel_children_hook],
      on_crashed=[_cancel_children_hook], on_failure=[_cancel_children_hook])
def sweep_flow(grid: dict[str, list[str]], name: str = "sweep", preset: PresetName = "smoke",
               exclude: list[dict[str, str]] | None = None, overrides: list[str] | None = None,
               storage: str | None = None, tracking_uri: str | None = None, config_path: str | None = None,
               task_tags: list[str] | None = None,
               points_as: Literal["auto", "subflows", "deployments"] = "auto",
               deployment: str = PIPELINE_DEPLOYMENT) -> SweepResult:
    """Run one pipeline per grid point and compare them in MLflow.

    Args:
        grid: Config fields and the values each takes, e.g. {"distill.lr": ["1e-4", "3e-4"]}; the points are
            every combination (at most 64).
        name: The sweep's name: its points are pipelines named <name>.<field>-<value>...
        preset: The shipped settings every point starts from (`pd presets` describes each).
        exclude: Combinations to leave out, each {FIELD: VALUE, ...}.
        overrides: Config fields every point changes, each KEY=VALUE.
        storage: Checkpoint store root of every point (default: the worker's PD_STORAGE).
        tracking_uri: MLflow tracking URI as the worker reaches it (default: the worker's MLFLOW_TRACKING_URI).
        config_path: A YAML config file merged over the preset (a path on the worker).
        task_tags: Tags of the points' training and evaluation tasks (default: gpu on a standing server).
        points_as: subflows (in this process, one after another), deployments (runs of `deployment` on the work
            pool), or auto: deployments on a standing Prefect server, subflows on the embedded one.
        deployment: The pipeline deployment the points run as (flow/deployment).
    """
    logger = get_run_logger()
    check_sweep_name(name)
    points = grid_points(name, merge_grids(grid), exclude=exclude or [])
    configs = point_configs(preset=preset, config_path=config_path, overrides=list(overrides or []), points=points,
                            storage=storage, tracking_uri=tracking_uri)
    leaders = teacher_leaders(configs)
    first = configs[points[0].name]
    tracker = tracker_for(first)
    parent_id = current_flow_run_id()
    run_id = tracker.start_run(run_name=f"sweep {name}", params={"preset": preset, "points": len(points),
                                                               **{f"grid.{k}": ",".join(v) for k, v in grid.items()}},
                               tags={"pd.kind": SWEEP_KIND, SWEEP_TAG: name, FLOW_RUN_TAG: parent_id})
    logger.info("sweep %s: %d points, %d teacher(s) to train or reuse", name, len(points), len(set(leaders.values())))
    common = {"preset": preset, "storage": first.storage.root, "tracking_uri": first.tracking.tracking_uri,
              "config_path": config_path, "task_tags": task_tags}
    base = list(overrides or [])
    api_url = get_current_settings().api.url
    remote = points_as == "deployments" or (points_as == "auto" and bool(api_url) and not is_embedded(api_url))
    # Children are tagged sweep:<name> and sweep-run:<id> on their flow runs only (flows.identity.sweep_tags):
    # a tags() context would tag every task run too, and each tagged task pays the concurrency-slot calls.
    if remote:
        outcomes = _as_deployments(points, leaders, common, base, name, deployment, logger=logger)
    else:
        outcomes = _in_process(points, leaders, common, base, name)
    report = publish_sweep_task(first, sweep=name, points={p.name: p.values for p in points}, run_id=run_id)
    failed = [n for n, o in outcomes.items() if isinstance(o, BaseException)]
    trained = {n: _trained(o) for n, o in outcomes.items()}
    tracker.end_run(run_id, status="FAILED" if failed else "FINISHED")
    tracker.flush()
    if failed:
        reasons = "; ".join(f"{n}: {str(outcomes[n]).splitlines()[0] if str(outcomes[n]) else type(outcomes[n])}"
                            for n in failed[:3])
        raise SweepFailedError(f"sweep {name}: {len(failed)} of {len(points)} points failed ({reasons}); rerun the "
                               f"same command to retry them, the complete ones are skipped")
    return SweepResult(sweep=name, teachers=leaders, trained=trained, report=report)


def _trained(outcome: object) -> int:
    """Checkpoints a point trained in this run (-1: unknown, a deployment run)."""
    if not isinstance(outcome, PipelineResult):
        return -1
    checkpoints = [outcome.teacher, *outcome.rounds, *([outcome.guided] if outcome.guided else [])]
    return sum(int(c.trained) for c in checkpoints)
