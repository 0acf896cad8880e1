"""The progressive-distillation pipeline flow: teacher, then one GPU task per halving (Algorithm 2).

    teacher (2N_0 steps) -> round 1 -> student N_0/2 -> round 2 -> ... -> student final_steps

With guidance.enabled, ``guide-distill`` (stage 1 of guided distillation) runs after the teacher and its
w-conditioned student is round 1's teacher.

Every round reads its teacher from the store and writes its student there; a rerun skips the
rounds whose checkpoints are complete and verified and continues a partial round from its state.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.settings import get_current_settings

from pd_core.config import flatten
from pd_core.jobs import pipeline_prefix
from pd_core.store import Lease, LeaseLostError, StoreError
from tasks.common import gpu_task_tags, open_store, resolve_config, tracker_for
from tasks.evaluate import evaluate_round_task, evaluate_teacher_task
from tasks.report import publish_report_task
from tasks.results import PipelineResult, RoundResult
from tasks.training import GUIDE_RUN_NAME, distill_round_task, ensure_teacher_task, guide_distill_task, round_run_name

LEASE_TTL_S = 15 * 60  # renewed every third of it while the flow runs; a crashed owner's lease expires after this


def pipeline_resource(name: str) -> dict[str, str]:
    """The Prefect event resource of a pipeline (automations and triggers match on it)."""
    return {"prefect.resource.id": f"pd.pipeline.{name}", "prefect.resource.name": name}


class LeaseGuard:
    """What the flow asks between tasks: is the pipeline's lease still ours?"""

    def __init__(self) -> None:
        self.lost: LeaseLostError | None = None  # set by the renewer thread

    def check(self) -> None:
        """Raise LeaseLostError once the lease was lost: another run owns the pipeline, so this one must not
        write another checkpoint (two writers would race on the same keys)."""
        if self.lost is not None:
            raise LeaseLostError(f"{self.lost}; this run stops before its next task (rerun once the other run ends)")


@contextlib.contextmanager
def _kept_alive(lease: Lease, *, logger) -> Iterator[LeaseGuard]:
    """Renew ``lease`` from a daemon thread every third of its TTL while the body runs (rounds outlast a TTL)."""
    stop = threading.Event()
    guard = LeaseGuard()

    def renew_until_stopped() -> None:
        while not stop.wait(lease.ttl_s / 3):
            try:
                lease.renew()
            except LeaseLostError as err:  # another run took the pipeline over: stop renewing, stop the flow
                logger.error("%s", err)
                guard.lost = err
                return
            except StoreError as err:  # storage hiccup: the next attempt may work, the TTL leaves room
                logger.warning("could not renew the pipeline lease (will retry): %s", err)

    thread = threading.Thread(target=renew_until_stopped, name="pd-lease-renewer", daemon=True)
    thread.start()
    try:
        yield guard
    finally:
        stop.set()
        thread.join()  # before the lease is released: no renewal races the release


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # noqa: BLE001 - called outside a flow run (tests, notebooks)
        return "local"


@flow(name="progressive-distillation")
def distillation_pipeline(preset: str = "smoke", overrides: list[str] | None = None, name: str | None = None,
                          teacher_uri: str | None = None, storage: str | None = None,
                          tracking_uri: str | None = None, config_path: str | None = None,
                          task_tags: list[str] | None = None) -> PipelineResult:
    """Distill a teacher round by round down to ``distill.final_steps``; evaluate, track and report each round.

    ``task_tags`` go on the training and evaluation tasks (a tag concurrency limit holds them to the
    worker's GPUs); by default ``gpu`` on a standing Prefect server, none on the embedded one.
    """
    logger = get_run_logger()
    cfg = resolve_config(preset=preset, config_path=config_path, overrides=overrides or [], name=name,
                         storage=storage, tracking_uri=tracking_uri, teacher_uri=teacher_uri)
    name = cfg.pipeline.name
    store = open_store(cfg)
    owner = f"{socket.gethostname()}:{os.getpid()}:flow-run-{_flow_run_id()}"
    gpu_tags = gpu_task_tags(task_tags, api_url=get_current_settings().api.url)
    with store.acquire_lease(f"{pipeline_prefix(name)}/lease", owner=owner, ttl_s=LEASE_TTL_S) as lease, \
            _kept_alive(lease, logger=logger) as guard:
        tracker = tracker_for(cfg)
        parent = tracker.start_run(run_name=name, params=flatten(cfg),
                                   tags={"pd.pipeline": name, "pd.kind": "pipeline",
                                         "prefect.flow_run_id": _flow_run_id()})
        logger.info("pipeline %s: store %s, MLflow %s", name, cfg.storage.root, tracker.run_link(parent))
        teacher = ensure_teacher_task.with_options(tags=gpu_tags)(cfg, parent_run_id=parent)
        guard.check()
        baselines = evaluate_teacher_task.with_options(tags=gpu_tags)(cfg, teacher=teacher)
        rounds, current, guided = [], teacher, None
        if cfg.guidance.enabled:  # stage 1: one w-conditioned call replaces the guided teacher's two
            guard.check()
            current = guide_distill_task.with_options(tags=gpu_tags)(cfg, teacher=teacher, parent_run_id=parent)
            guard.check()
            evaluated = evaluate_round_task.with_options(task_run_name=f"eval-{GUIDE_RUN_NAME}", tags=gpu_tags)(
                cfg, student=current)
            guided = RoundResult(student=current, metrics=evaluated[0] if evaluated else None,
                                 other_weights=evaluated[1:])
        for round_index, (t_steps, s_steps) in enumerate(cfg.distill.rounds(), start=1):
            run_name = round_run_name(round_index=round_index, teacher_steps=t_steps, student_steps=s_steps)
            guard.check()
            student = distill_round_task.with_options(task_run_name=run_name, tags=gpu_tags)(
                cfg, teacher=current, round_index=round_index, parent_run_id=parent)
            guard.check()
            evaluated = evaluate_round_task.with_options(task_run_name=f"eval-{run_name}", tags=gpu_tags)(
                cfg, student=student)
            metrics = evaluated[0] if evaluated else None
            rounds.append(RoundResult(student=student, metrics=metrics, other_weights=evaluated[1:]))
            emit_event(event="pd.round.completed", resource=pipeline_resource(name),
                       payload={"round": round_index, "teacher_steps": t_steps, "student_steps": s_steps,
                                "checkpoint_uri": student.uri, "checkpoint_sha256": student.sha256,
                                "metrics": metrics, "trained": student.trained})
            current = student
        guard.check()
        report = publish_report_task(cfg, teacher=teacher, baselines=baselines, rounds=rounds, parent_run_id=parent,
                                     guided=guided)
        tracker.end_run(parent)
        pending = tracker.flush()
        if pending:
            logger.warning("MLflow: %d tracking calls still pending in the journal; they replay on the next run",
                           pending)
    return PipelineResult(pipeline=name, teacher=teacher, rounds=[r.student for r in rounds], report=report,
                          guided=guided.student if guided else None)
