"""Teacher-training flow: trains (or finds) a pipeline's teacher and announces it with an event.

The ``pd.teacher.completed`` event carries the teacher's URI and the pipeline's MLflow parent run;
the ``pd-distill`` deployment's trigger (deployments/) starts the distillation pipeline from it,
which continues that parent run: one MLflow parent per pipeline across both flows.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.settings import get_current_settings

from flows.identity import PresetName, current_flow_run_id, run_tags, tag_flow_run, teacher_run_name
from flows.pipeline import pipeline_resource
from pd_core.jobs import CheckpointInfo
from tasks.common import gpu_task_tags, resolve_config, start_pipeline_run, tracker_for
from tasks.training import ensure_teacher_task


@flow(name="train-teacher", flow_run_name=teacher_run_name)
def train_teacher_flow(preset: PresetName = "smoke", overrides: list[str] | None = None, name: str | None = None,
                       storage: str | None = None, tracking_uri: str | None = None,
                       config_path: str | None = None, task_tags: list[str] | None = None) -> CheckpointInfo:
    """Train the teacher of pipeline ``name`` and emit ``pd.teacher.completed`` with its URI.

    The MLflow parent run it opens is the pipeline's: the triggered distillation continues it.

    Args:
        preset: The shipped settings to start from (`pd presets` describes each).
        overrides: Config fields to change, each KEY=VALUE, e.g. teacher.updates=2000; the distillation
            run started by the trigger gets the same.
        name: The pipeline name; its checkpoints live under pipelines/NAME (default: the preset's name).
        storage: Checkpoint store root, a path or s3://bucket/prefix (default: the worker's PD_STORAGE).
        tracking_uri: MLflow tracking URI as the worker reaches it (default: the worker's MLFLOW_TRACKING_URI).
        config_path: A YAML config file merged over the preset (a path on the worker).
        task_tags: Tags of the training task, which a tag concurrency limit holds to the worker's GPUs
            (default: gpu on a standing Prefect server, none on the embedded one).
    """
    logger = get_run_logger()
    cfg = resolve_config(preset=preset, config_path=config_path, overrides=overrides or [], name=name,
                         storage=storage, tracking_uri=tracking_uri)
    tag_flow_run(run_tags(pipeline=cfg.pipeline.name, preset=preset))
    tracker = tracker_for(cfg)
    parent = start_pipeline_run(tracker, cfg, tags={"pd.pipeline": cfg.pipeline.name, "pd.kind": "pipeline",
                                                    "prefect.teacher_flow_run_id": current_flow_run_id()})
    gpu_tags = gpu_task_tags(task_tags, api_url=get_current_settings().api.url)
    teacher = ensure_teacher_task.with_options(tags=gpu_tags)(cfg, parent_run_id=parent)
    tracker.end_run(parent)  # finished until a distillation run continues it
    tracker.flush()
    emit_event(event="pd.teacher.completed", resource=pipeline_resource(cfg.pipeline.name),
               payload={"teacher_uri": teacher.uri, "teacher_sha256": teacher.sha256, "preset": preset,
                        "overrides": list(overrides or []), "name": cfg.pipeline.name,
                        # resolved values, so the distillation run reads the very store the teacher is in
                        "storage": cfg.storage.root, "tracking_uri": cfg.tracking.tracking_uri,
                        "mlflow_parent_run_id": tracker.resolve_run_id(parent) or parent})
    logger.info("teacher of %s ready at %s", cfg.pipeline.name, teacher.uri)
    return teacher
