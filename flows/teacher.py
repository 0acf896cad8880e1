"""Teacher-training flow: trains (or finds) a pipeline's teacher and announces it with an event.

The ``pd.teacher.completed`` event carries the teacher's URI; the ``pd-distill`` deployment's
trigger (deployments/) starts the distillation pipeline from it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.settings import get_current_settings

from flows.pipeline import pipeline_resource
from pd_core.config import flatten
from pd_core.jobs import CheckpointInfo
from tasks.common import gpu_task_tags, resolve_config, tracker_for
from tasks.training import ensure_teacher_task


@flow(name="train-teacher")
def train_teacher_flow(preset: str = "smoke", overrides: list[str] | None = None, name: str | None = None,
                       storage: str | None = None, tracking_uri: str | None = None,
                       config_path: str | None = None, task_tags: list[str] | None = None) -> CheckpointInfo:
    """Train the teacher of pipeline ``name`` and emit ``pd.teacher.completed`` with its URI.

    ``task_tags``: as for the pipeline flow (default ``gpu`` on a standing Prefect server only).
    """
    logger = get_run_logger()
    cfg = resolve_config(preset=preset, config_path=config_path, overrides=overrides or [], name=name,
                         storage=storage, tracking_uri=tracking_uri)
    tracker = tracker_for(cfg)
    parent = tracker.start_run(run_name=f"{cfg.pipeline.name}-teacher", params=flatten(cfg),
                               tags={"pd.pipeline": cfg.pipeline.name, "pd.kind": "teacher-pipeline"})
    gpu_tags = gpu_task_tags(task_tags, api_url=get_current_settings().api.url)
    teacher = ensure_teacher_task.with_options(tags=gpu_tags)(cfg, parent_run_id=parent)
    tracker.end_run(parent)
    tracker.flush()
    emit_event(event="pd.teacher.completed", resource=pipeline_resource(cfg.pipeline.name),
               payload={"teacher_uri": teacher.uri, "teacher_sha256": teacher.sha256, "preset": preset,
                        "overrides": list(overrides or []), "name": cfg.pipeline.name,
                        # resolved values, so the distillation run reads the very store the teacher is in
                        "storage": cfg.storage.root, "tracking_uri": cfg.tracking.tracking_uri})
    logger.info("teacher of %s ready at %s", cfg.pipeline.name, teacher.uri)
    return teacher
