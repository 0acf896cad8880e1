"""Publish a sweep's comparison: one row per point, one column per metric and step count (tasks/tracking/sweeps.py).

Each point's wide quality table is read from the store (``pipelines/<point>/report/quality.csv``, what
its pipeline published), so points run in this process and points run as deployment runs elsewhere
are compared the same way. The table goes to the store (``sweeps/<sweep>/comparison.csv``), to Prefect
as a table artifact, and to the sweep's MLflow run as a table artifact (``comparison.csv`` and its
``mlflow.log_table`` JSON) with the FD-vs-steps plot (``fd_vs_steps.png``); the saved runs view of the
sweep is created or extended.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from pd_core.config import Config
from pd_core.jobs import pipeline_prefix
from tasks.common import open_store, tracker_for
from tasks.progress import artifact_key
from tasks.tracking.sweeps import (
    comparison_table,
    fd_columns,
    fd_name_of,
    fd_plot_png,
    view_columns,
    view_filter,
    view_id,
)
from tasks.training import storage_error_only

PLOT_FILE = "fd_vs_steps.png"
TABLE_FILE = "comparison.csv"


@dataclass(frozen=True)
class SweepReport:
    """Where a sweep's comparison is: the table as text, its CSV in the store, the MLflow run and view."""

    table: str
    table_uri: str
    mlflow_link: str
    mlflow_view: str | None = None
    missing: list[str] = field(default_factory=list)  # points without a quality table (failed or evaluation off)


def sweep_prefix(sweep: str) -> str:
    """Where a sweep's own files live in the store."""
    return f"sweeps/{sweep}"


def _quality(store, name: str) -> pd.DataFrame | None:
    key = f"{pipeline_prefix(name)}/report/quality.csv"
    if not store.exists(key):
        return None
    return pd.read_csv(io.BytesIO(store.get_bytes(key)))


def concise(table: pd.DataFrame, *, fields: list[str], fd_name: str | None) -> pd.DataFrame:
    """What the CLI prints: the point, its grid values and FD per step count (distilled, then the teacher's DDIM)."""
    if not fd_name:
        return table[[c for c in table.columns if c == "point" or c in fields]]
    fd = [c for s in ("distilled", "teacher_ddim") for c in fd_columns(table, fd_name=fd_name, sampler=s).values()]
    return table[["point", *fields, *fd]]


@task(name="publish-sweep", task_run_name="sweep-report", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=storage_error_only)
def publish_sweep_task(cfg: Config, *, sweep: str, points: dict[str, dict[str, str]],
                       run_id: str | None) -> SweepReport:
    """The comparison table of ``points`` ({point name: grid values}) to store, Prefect and the sweep's MLflow
    run ``run_id``, with the FD-vs-steps plot and the saved view ``pd-sweep-<sweep>``."""
    logger = get_run_logger()
    store, tracker = open_store(cfg), tracker_for(cfg)
    tables = {name: _quality(store, name) for name in points}
    table = comparison_table(points, tables)
    key = f"{sweep_prefix(sweep)}/{TABLE_FILE}"
    store.put_bytes(key, table.to_csv(index=False).encode())
    fd_name = fd_name_of(table)
    create_table_artifact(table=table.astype(object).where(table.notna(), None).to_dict(orient="records"),
                          key=artifact_key(f"{sweep}-sweep"),
                          description=f"sweep {sweep}: one row per point, one column per metric and step count "
                                      f"({fd_name or 'no FD'}; lower is better; CSV: {store.uri(key)})")
    tracker.log_table(run_id, table, artifact_file=TABLE_FILE)
    view = None
    if fd_name:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PLOT_FILE
            path.write_bytes(fd_plot_png(table, fd_name=fd_name, title=f"sweep {sweep}: distilled {fd_name} vs steps"))
            tracker.log_artifact(run_id, str(path))
        params, metrics = view_columns(list(next(iter(points.values()), {})), table, fd_name=fd_name)
        tracker.save_runs_view(view_id=view_id(sweep), name=f"Sweep {sweep}: grid values and FD by steps",
                               search_filter=view_filter(sweep), params=params, metrics=metrics)
        view = tracker.view_link(view_id(sweep))
    tracker.flush()
    missing = [name for name, wide in tables.items() if wide is None]
    logger.info("sweep %s: comparison of %d points published%s", sweep, len(points),
                f" ({len(missing)} without a quality table)" if missing else "")
    text = concise(table, fields=list(next(iter(points.values()), {})), fd_name=fd_name).to_string(
        index=False, float_format=lambda v: f"{v:.4g}")
    return SweepReport(table=text, table_uri=store.uri(key), mlflow_link=tracker.run_link(run_id), mlflow_view=view,
                       missing=missing)
