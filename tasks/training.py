"""Prefect tasks at the compute boundaries: ensure the teacher, encode a text-to-image pipeline's data, guided
distillation's stage 1, distill one round.

They take the resolved config and :class:`pd_core.jobs.CheckpointInfo` values (URIs, sha256s),
never tensors or models, and return the CheckpointInfo with its MLflow run id. The flows tag them (see
``tasks.common.gpu_task_tags``) where a tag concurrency limit can hold them to the GPUs a worker has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

from pd_core import jobs, launch, text_to_image
from pd_core.config import Config, pipeline_params
from pd_core.jobs import CheckpointInfo
from pd_core.store import CheckpointStore, StorageIOError
from tasks import kubernetes
from tasks.common import open_store, tracker_for
from tasks.progress import ProgressReporter

# Test hook: inject a NaN loss at this update (see tests/faults/test_nan_loss.py). Never set in production.
NAN_AT_ENV = "PD_TEST_NAN_AT_STEP"


def storage_error_only(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry a task only when it failed on transient storage I/O (unreachable, timed out, throttled).

    A full disk, a permission error, a corrupt checkpoint (StoreError), a NaN loss or a bad config
    never heals by retrying.
    """
    try:
        state.result()
    except StorageIOError as err:
        return err.transient
    except (ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - any other failure is final: no retry
        return False
    return False


def _fault_step() -> int | None:
    value = os.environ.get(NAN_AT_ENV)
    return int(value) if value else None


def run_params(cfg: Config, *, round_index: int, teacher_steps: int, student_steps: int) -> dict[str, Any]:
    """MLflow params of every run: the settings that tell pipelines apart (``pipeline_params``) plus round and
    step counts; the whole resolved config is the parent run's ``config.yaml``."""
    return {**pipeline_params(cfg), "round": round_index, "teacher_steps": teacher_steps,
            "student_steps": student_steps}


def _torchrun(cfg: Config, *, job: str, reporter: ProgressReporter, teacher: CheckpointInfo | None = None,
              round_index: int | None = None) -> CheckpointInfo:
    """The job under torchrun: a JobSet of runtime.nodes pods (launcher kubernetes, nodes > 1; its phase and
    restarts go to the task's log), else local torchrun agents (progress to ``reporter``)."""
    if cfg.runtime.launcher == "kubernetes" and cfg.runtime.nodes > 1:
        return kubernetes.run_on_kubernetes(cfg, job=job, teacher=teacher, round_index=round_index,
                                            fault_at_step=_fault_step(), log_line=get_run_logger().info)
    return launch.launch_job(cfg, job=job, teacher=teacher, round_index=round_index, on_progress=reporter,
                             fault_at_step=_fault_step())


GPU_TASK = dict(cache_policy=NONE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                retry_condition_fn=storage_error_only)


Work = Callable[[CheckpointStore, ProgressReporter], CheckpointInfo]


def _run_with_tracking(cfg: Config, *, run_name: str, parent_run_id: str | None, params: dict, kind: str,
                       progress_key: str, description: str, work: Work) -> CheckpointInfo:
    """Shared body: open a child MLflow run, train with progress, tag the checkpoint, close the run.

    The MLflow run is named ``<pipeline>/<run_name>`` (``smoke/round-03-2to1``), so runs of different
    pipelines tell themselves apart in MLflow's tables and Compare page. A run of this parent found
    again (a retried task, or the teacher's run made by the teacher flow) is continued, and keeps its
    ``skipped`` tag unless this attempt trained.
    """
    logger = get_run_logger()
    tracker = tracker_for(cfg)
    run_id = tracker.find_run(tags={"pd.pipeline_run": parent_run_id, "pd.run": run_name}) if parent_run_id else None
    found = run_id is not None
    if run_id is None:
        run_id = tracker.start_run(run_name=mlflow_run_name(cfg, run_name), parent_run_id=parent_run_id,
                                   params=params, tags={"pd.pipeline": cfg.pipeline.name, "pd.kind": kind,
                                                        "pd.run": run_name, "pd.pipeline_run": parent_run_id or ""})
    reporter = ProgressReporter(key=progress_key, description=description, logger=logger,
                                log_metrics=lambda m, step: tracker.log_metrics(run_id, m, step=step))
    store = open_store(cfg)
    try:
        info = work(store, reporter)
    except BaseException:
        tracker.end_run(run_id, status="FAILED")
        raise
    tags = {"checkpoint_uri": info.uri, "checkpoint_sha256": info.sha256}
    if info.trained or not found:
        tags["skipped"] = str(not info.trained).lower()
    tracker.set_tags(run_id, tags)
    if info.trained:
        tracker.log_metrics(run_id, {"train_seconds": info.train_seconds, "resumed_from": float(info.resumed_from)})
    tracker.end_run(run_id)  # evaluation metrics are added to the finished run later
    tracker.flush()
    return info.tracked(run_id)


@task(name="ensure-teacher", task_run_name="teacher", **GPU_TASK)
def ensure_teacher_task(cfg: Config, *, parent_run_id: str | None = None,
                        shared_key: str | None = None) -> CheckpointInfo:
    """Train the teacher (or import pipeline.teacher_uri, or skip a complete one); returns its checkpoint info.

    ``shared_key``: use another pipeline's teacher at this key of the same store, where it is, when its lineage
    is this pipeline's teacher (a sweep's points; :func:`pd_core.jobs.shared_teacher`).
    """
    start = cfg.distill.start_steps

    def work(store: CheckpointStore, reporter: ProgressReporter) -> CheckpointInfo:
        if shared_key is not None:
            return jobs.shared_teacher(cfg, store, key=shared_key)
        if launch.is_data_parallel(cfg):  # torchrun runs the job in nproc processes on each of runtime.nodes
            return _torchrun(cfg, job="teacher", reporter=reporter)
        return jobs.ensure_teacher(cfg, store, on_progress=reporter, fault_at_step=_fault_step())

    return _run_with_tracking(cfg, run_name="teacher", parent_run_id=parent_run_id, kind="teacher",
                              params=run_params(cfg, round_index=0, teacher_steps=start, student_steps=start),
                              progress_key=f"{cfg.pipeline.name}-teacher", description="teacher training", work=work)


def mlflow_run_name(cfg: Config, run_name: str) -> str:
    """``smoke/round-03-2to1``: a child run's MLflow name, its pipeline first."""
    return f"{cfg.pipeline.name}/{run_name}"


GUIDE_RUN_NAME = "guide-distill"  # the task-run name of stage 1 (its MLflow run: <pipeline>/guide-distill)


def guidance_params(cfg: Config) -> dict[str, Any]:
    """The guidance-weight range stage 1 and the rounds of a guided pipeline train on (MLflow params)."""
    return {"w_min": cfg.guidance.w_min, "w_max": cfg.guidance.w_max}


@task(name="guide-distill", task_run_name=GUIDE_RUN_NAME, **GPU_TASK)
def guide_distill_task(cfg: Config, *, teacher: CheckpointInfo, parent_run_id: str | None = None) -> CheckpointInfo:
    """Stage 1 of guided distillation: a student that takes w learns the guided teacher (2 calls -> 1 call)."""
    steps = teacher.steps

    def work(store: CheckpointStore, reporter: ProgressReporter) -> CheckpointInfo:
        if launch.is_data_parallel(cfg):  # torchrun runs the job in nproc processes on each of runtime.nodes
            return _torchrun(cfg, job="guide", teacher=teacher, reporter=reporter)
        return jobs.run_guide_distill(cfg, store, teacher=teacher, on_progress=reporter, fault_at_step=_fault_step())

    params = {**run_params(cfg, round_index=0, teacher_steps=steps, student_steps=steps), **guidance_params(cfg)}
    return _run_with_tracking(cfg, run_name=GUIDE_RUN_NAME, parent_run_id=parent_run_id, kind="guided_student",
                              params=params, progress_key=f"{cfg.pipeline.name}-{GUIDE_RUN_NAME}",
                              description=f"guided distillation, stage 1 (w in [{cfg.guidance.w_min:g}, "
                                          f"{cfg.guidance.w_max:g}], {steps} steps)", work=work)


@task(name="encode-data", task_run_name="encode-data", **GPU_TASK)
def encode_data_task(cfg: Config) -> text_to_image.EncodedInfo:
    """A text-to-image pipeline's image-caption data through the teacher's VAE and text encoder, once (reused when
    the store has it); every later task trains on the stored latents and embeddings."""
    info = text_to_image.encode_data(cfg, open_store(cfg))
    get_run_logger().info("encoded data %s: %d images, %d distinct captions (%s)", info.key, info.count,
                          info.captions, "reused" if info.reused else "encoded now")
    return info


def round_run_name(*, round_index: int, teacher_steps: int, student_steps: int) -> str:
    """``round-03-64to32``: the task-run name of a round (its MLflow run: :func:`mlflow_run_name`)."""
    return f"round-{round_index:02d}-{teacher_steps}to{student_steps}"


@task(name="distill-round", **GPU_TASK)
def distill_round_task(cfg: Config, *, teacher: CheckpointInfo, round_index: int,
                       parent_run_id: str | None = None) -> CheckpointInfo:
    """Load the teacher from the store, distill its 2-step DDIM into a 1-step student, save the student."""
    t_steps, s_steps = teacher.steps, teacher.steps // 2
    name = round_run_name(round_index=round_index, teacher_steps=t_steps, student_steps=s_steps)

    def work(store: CheckpointStore, reporter: ProgressReporter) -> CheckpointInfo:
        if launch.is_data_parallel(cfg):  # torchrun runs the round in nproc processes on each of runtime.nodes
            return _torchrun(cfg, job="round", round_index=round_index, teacher=teacher, reporter=reporter)
        return jobs.run_round(cfg, store, round_index=round_index, teacher=teacher, on_progress=reporter,
                              fault_at_step=_fault_step())

    params = run_params(cfg, round_index=round_index, teacher_steps=t_steps, student_steps=s_steps)
    if cfg.guidance.enabled:
        params.update(guidance_params(cfg))
    return _run_with_tracking(cfg, run_name=name, parent_run_id=parent_run_id, kind="student",
                              params=params,
                              progress_key=f"{cfg.pipeline.name}-{name}",
                              description=f"distilling {t_steps} -> {s_steps} steps", work=work)
