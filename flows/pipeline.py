"""The progressive-distillation pipeline flow: teacher, then one GPU task per halving (Algorithm 2).

    teacher (2N_0 steps) -> round 1 -> student N_0/2 -> round 2 -> ... -> student final_steps

With guidance.enabled, ``guide-distill`` (stage 1 of guided distillation) runs after the teacher and its
w-conditioned student is round 1's teacher. A text-to-image pipeline (a Stable Diffusion-style teacher,
image-caption data) runs ``encode-data`` after the teacher: the rounds train on the stored latents.

Every round reads its teacher from the store and writes its student there; a rerun skips the
rounds whose checkpoints are complete and verified and continues a partial round from its state.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

from prefect import Flow, State, flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.events import emit_event
from prefect.settings import get_current_settings

from flows.identity import (
    PresetName,
    current_flow_run_id,
    flow_run_page,
    pipeline_run_name,
    run_tags,
    sweep_tags,
    tag_flow_run,
)
from pd_core.config import Config
from pd_core.jobs import pipeline_prefix
from pd_core.store import Lease, LeaseHeldError, LeaseLostError, StoreError
from pd_core.text_to_image import is_text_pipeline
from tasks.common import gpu_task_tags, open_store, resolve_config, start_pipeline_run, tracker_for
from tasks.evaluate import evaluate_round_task, evaluate_teacher_task
from tasks.reconcile import FLOW_RUN_TAG, end_dead_run
from tasks.report import publish_report_task
from tasks.results import PipelineResult, RoundResult
from tasks.training import (
    GUIDE_RUN_NAME,
    distill_round_task,
    encode_data_task,
    ensure_teacher_task,
    guide_distill_task,
    round_run_name,
)

LEASE_TTL_S = 15 * 60  # a crashed owner's lease expires after this
LEASE_RENEW_S = LEASE_TTL_S / 3  # how often the flow renews its lease while it runs (well inside the TTL)


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
def _kept_alive(lease: Lease, *, logger, every_s: float) -> Iterator[LeaseGuard]:
    """Renew ``lease`` from a daemon thread every ``every_s`` seconds while the body runs (rounds outlast a TTL).

    ``every_s`` must be well below the lease's TTL: a renewal late by the rest of the TTL lets another owner in.
    """
    if not 0 < every_s < lease.ttl_s:
        raise ValueError(f"every_s must be between 0 and the lease's TTL ({lease.ttl_s} s), got {every_s}")
    stop = threading.Event()
    guard = LeaseGuard()

    def renew_until_stopped() -> None:
        while not stop.wait(every_s):
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


def parent_run(tracker, cfg: Config, *, continue_run: str | None, logger,
               sweep: dict[str, str] | None = None) -> str | None:
    """The pipeline's MLflow parent run: ``continue_run`` (the teacher flow's) reopened when MLflow has it,
    else a new one named after the pipeline. ``sweep``: the tags and params of a sweep's point
    (:func:`tasks.tracking.sweeps.point_tags`)."""
    tags = {"pd.pipeline": cfg.pipeline.name, "pd.kind": "pipeline", FLOW_RUN_TAG: current_flow_run_id(),
            **(sweep or {})}
    if continue_run:
        reopened = tracker.reopen_run(continue_run)
        if reopened is not None:
            tracker.set_tags(reopened, tags)
            return reopened
        logger.warning("MLflow has no run %s to continue: this pipeline gets a new parent run", continue_run)
    return start_pipeline_run(tracker, cfg, tags=tags, params=sweep)


def _end_tracking_of_failed_run(_flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Flow hook on failure/crash: the run's MLflow runs still RUNNING (its parent run) are marked FAILED.

    A run refused its lease started no MLflow run: nothing to end, and MLflow is not even opened.
    """
    try:
        if isinstance(state.result(raise_on_failure=False), LeaseHeldError):
            return
    except Exception:  # noqa: BLE001, S110 - the result is unreadable: end the runs anyway
        pass
    params = dict(flow_run.parameters or {})
    try:
        cfg = resolve_config(preset=params.get("preset", "smoke"), config_path=params.get("config_path"),
                             overrides=params.get("overrides") or [], name=params.get("name"),
                             storage=params.get("storage"), tracking_uri=params.get("tracking_uri"),
                             teacher_uri=params.get("teacher_uri"))
        tracker_for(cfg).end_abandoned_runs(tags={FLOW_RUN_TAG: str(flow_run.id)}, status="FAILED")
    except Exception:  # noqa: BLE001 - a config that failed the run has no MLflow run to end
        return


@flow(name="progressive-distillation", flow_run_name=pipeline_run_name, on_failure=[_end_tracking_of_failed_run],
      on_crashed=[_end_tracking_of_failed_run])
def distillation_pipeline(preset: PresetName = "smoke", overrides: list[str] | None = None, name: str | None = None,
                          teacher_uri: str | None = None, storage: str | None = None,
                          tracking_uri: str | None = None, config_path: str | None = None,
                          task_tags: list[str] | None = None,
                          mlflow_parent_run_id: str | None = None,
                          restart_from: int | None = None, shared_teacher: str | None = None,
                          sweep: dict[str, str] | None = None) -> PipelineResult:
    """Distill a teacher round by round down to ``distill.final_steps``; evaluate, track and report each round.

    Args:
        preset: The shipped settings to start from (`pd presets` describes each).
        overrides: Config fields to change, each KEY=VALUE, e.g. distill.lr=1e-4 or eval.num_samples=1000.
        name: The pipeline name; its checkpoints live under pipelines/NAME (default: the preset's name).
        teacher_uri: Import this teacher instead of training one: a checkpoint folder URI, or
            diffusers:<folder or URL> (a UNet2DModel with its scheduler config, or a StableDiffusionPipeline
            folder with data.name captions).
        storage: Checkpoint store root, a path or s3://bucket/prefix (default: the worker's PD_STORAGE).
        tracking_uri: MLflow tracking URI as the worker reaches it (default: the worker's MLFLOW_TRACKING_URI).
        config_path: A YAML config file merged over the preset (a path on the worker).
        task_tags: Tags of the training and evaluation tasks, which a tag concurrency limit holds to the
            worker's GPUs (default: gpu on a standing Prefect server, none on the embedded one).
        mlflow_parent_run_id: Continue this MLflow parent run (the teacher flow's, set by the trigger)
            instead of starting one.
        restart_from: Retrain round N and every later round (0: the teacher too), replacing their
            checkpoints; what comes before N is kept (`pd run --restart-from N`).
        shared_teacher: Use the teacher at this key of the same store where it is (no copy) when its lineage is
            this pipeline's teacher; set by `pd sweep` for points that share one.
        sweep: The sweep this pipeline is a point of, as MLflow tags and params (pd.sweep and pd.sweep.FIELD
            values); set by `pd sweep`.

    A previous run that died holding the lease gets its MLflow runs marked KILLED and its Prefect
    flow run CRASHED.
    """
    logger = get_run_logger()
    cfg = resolve_config(preset=preset, config_path=config_path, overrides=overrides or [], name=name,
                         storage=storage, tracking_uri=tracking_uri, teacher_uri=teacher_uri,
                         restart_from=restart_from)
    name = cfg.pipeline.name
    tag_flow_run(run_tags(pipeline=name, preset=preset) + sweep_tags(sweep))
    store = open_store(cfg)
    flow_run_id = current_flow_run_id()
    owner = f"{socket.gethostname()}:{os.getpid()}:flow-run-{flow_run_id}"
    gpu_tags = gpu_task_tags(task_tags, api_url=get_current_settings().api.url)
    with store.acquire_lease(f"{pipeline_prefix(name)}/lease", owner=owner, ttl_s=LEASE_TTL_S,
                             meta={"flow_run_id": flow_run_id}) as lease, \
            _kept_alive(lease, logger=logger, every_s=LEASE_RENEW_S) as guard:
        tracker = tracker_for(cfg)
        if lease.taken_over is not None:
            end_dead_run(lease.taken_over, tracker=tracker, logger=logger, current_flow_run_id=flow_run_id)
        parent = parent_run(tracker, cfg, continue_run=mlflow_parent_run_id, logger=logger, sweep=sweep)
        logger.info("pipeline %s: store %s, MLflow %s", name, cfg.storage.root, tracker.run_link(parent))
        teacher = ensure_teacher_task.with_options(tags=gpu_tags)(cfg, parent_run_id=parent, shared_key=shared_teacher)
        guard.check()
        if is_text_pipeline(cfg):  # latents and prompt embeddings once; no later task runs the VAE or text encoder
            encode_data_task.with_options(tags=gpu_tags)(cfg)
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
    run_name, run_url = flow_run_page()
    return PipelineResult(pipeline=name, teacher=teacher, rounds=[r.student for r in rounds], report=report,
                          guided=guided.student if guided else None, prefect_run=run_name, prefect_url=run_url)
