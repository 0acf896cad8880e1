"""Publish the pipeline's report: the quality-vs-steps table and the sampler model.

Writes the table to the store (CSV, long CSV, markdown), to Prefect (table + markdown artifacts)
and to MLflow (parent-run artifacts and metrics named per step count, so pipelines line up in the
compare view), and registers the few-step students as versions of one MLflow model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from safetensors.torch import save_file

from pd_core.config import Config
from pd_core.jobs import CheckpointInfo
from pd_core.metrics import quality_long, quality_table
from pd_core.metrics.table import summary_view
from tasks.common import open_store, tracker_for
from tasks.evaluate import numeric_metrics
from tasks.progress import artifact_key
from tasks.results import Report, RoundResult
from tasks.training import storage_error_only

FEW_STEPS = 4  # students with at most this many steps are registered as samplers


def _register_students(cfg: Config, store, tracker, rounds: list[RoundResult], *,
                       fd_name: str | None) -> dict[str, str]:
    """Log few-step students as MLflow models; alias `best-few-step` (lowest FD) and `final` (fewest steps)."""
    name = cfg.tracking.registered_model or f"pd-{cfg.pipeline.name}"
    versions: dict[str, str] = {}
    candidates = [r for r in rounds if r.student.steps <= FEW_STEPS] or rounds[-1:]
    scored = [(r.metrics[fd_name], r.student.key) for r in candidates if r.metrics and fd_name in r.metrics]
    # Decided before logging, so they travel with the (journaled) registration: a version registered
    # while MLflow is down gets its aliases when the journal replays.
    targets = {"final": rounds[-1].student.key, "best-few-step": min(scored)[1] if scored else None}
    for r in candidates:
        student = r.student
        aliases = [a for a, key in targets.items() if key == student.key]
        marker = f"{student.key}.mlflow-{tracker.experiment}.json"
        if store.exists(marker):  # registered by an earlier run of this pipeline: no duplicate version
            versions[student.key] = json.loads(store.get_bytes(marker))["version"]
            for alias in aliases:  # the aliases may point elsewhere since (another pipeline's run): point back
                tracker.set_alias(registered_model=name, alias=alias, version=versions[student.key])
            continue
        tensors, manifest = store.load_checkpoint(student.key)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file(tensors, str(path))
            _, version = tracker.log_sampler_model(student.mlflow_run_id, weights_path=str(path), manifest=manifest,
                                                   registered_model=name, alias=aliases,
                                                   tags={"steps": str(student.steps), "checkpoint_uri": student.uri})
        if version is not None:
            versions[student.key] = version
            store.put_bytes(marker, json.dumps({"version": version, "model": name}).encode())
    return {"registered_model": name, **{k.rsplit("/", 1)[-1]: v for k, v in versions.items()}}


@task(name="publish-report", task_run_name="report", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=storage_error_only)
def publish_report_task(cfg: Config, *, teacher: CheckpointInfo, baselines: list[dict], rounds: list[RoundResult],
                        parent_run_id: str | None = None, guided: RoundResult | None = None) -> Report:
    """Quality-vs-steps table to store, Prefect and MLflow; register the few-step samplers.

    ``guided``: guided distillation's stage-1 student, whose records join the table as ``distilled`` at
    the teacher's step count.
    """
    logger = get_run_logger()
    name = cfg.pipeline.name
    store, tracker = open_store(cfg), tracker_for(cfg)
    link = tracker.run_link(parent_run_id)
    records = list(baselines) + [rec for r in ([guided] if guided else []) + rounds for rec in r.records]
    table, report_uri = "", None
    fd_name = next((k for r in records for k in r if k.startswith("fd_") or k == "fid"), None)
    if records:
        wide, long = quality_table(records), quality_long(records)
        prefix = f"pipelines/{name}/report"
        store.put_bytes(f"{prefix}/quality.csv", wide.to_csv(index=False).encode())
        store.put_bytes(f"{prefix}/quality_long.csv", long.to_csv(index=False).encode())
        markdown = wide.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else wide.to_string(index=False)
        store.put_bytes(f"{prefix}/quality.md", markdown.encode())
        table = summary_view(wide).to_string(index=False, float_format=lambda v: f"{v:.4g}")
        report_uri = store.uri(f"{prefix}/quality.csv")
        create_table_artifact(table=json.loads(wide.to_json(orient="records")), key=artifact_key(f"{name}-quality"),
                              description=f"{name}: quality vs sampling steps ({fd_name} is "
                                          f"{'FID' if fd_name == 'fid' else 'FD in our classifier feature space'})")
        tracker.log_table(parent_run_id, wide, artifact_file="quality.csv")
        tracker.log_table(parent_run_id, long, artifact_file="quality_long.csv")
        for rec in records:
            if rec["sampler"] != "floor":
                steps = int(rec["steps"])
                tracker.log_metrics(parent_run_id, {f"{rec['sampler']}_{k}": v for k, v in numeric_metrics(rec).items()
                                                    if k != "n_samples"}, step=steps)
    registered = _register_students(cfg, store, tracker, rounds, fd_name=fd_name) if rounds else {}
    grids = [(r.student.steps, r.metrics.get("sample_grid")) for r in rounds if r.metrics]
    lines = [f"# Pipeline `{name}`", "", f"- MLflow: {link}", f"- teacher: `{teacher.uri}`"]
    if guided:
        lines.append(f"- guided student (stage 1, {guided.student.steps} steps, takes w): `{guided.student.uri}`")
    lines += [f"- {r.student.steps}-step student: `{r.student.uri}`" for r in rounds]
    lines += ["", "## Sample grids", ""] + [f"- {s} steps: `{g}`" for s, g in grids if g]
    if registered:
        lines += ["", f"Registered model `{registered['registered_model']}` (aliases `final`, `best-few-step`)."]
    if report_uri:
        lines += ["", f"Quality table: `{report_uri}`"]
    create_markdown_artifact(markdown="\n".join(lines), key=artifact_key(f"{name}-report"),
                             description=f"{name}: where everything is")
    tracker.log_text(parent_run_id, "\n".join(lines), artifact_file="report.md")
    tracker.flush()
    logger.info("report of %s published (%d records)", name, len(records))
    return Report(mlflow_link=link, table=table, report_uri=report_uri, registered=registered)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401  (pandas' to_markdown needs it)
    except ImportError:
        return False
    return True


