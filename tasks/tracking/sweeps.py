"""What MLflow holds of a sweep: its points' tags and params, the comparison table, the FD plot, its saved view.

- Every point's pipeline run carries ``pd.sweep`` = the sweep's name and ``pd.sweep.<field>`` = the point's
  value of each grid field, as tags (the runs table filters on them) and as params (they show as columns).
- The sweep's own run (tag ``pd.kind`` = ``sweep``) holds the comparison table: one row per point, the grid
  values, then one column per metric and step count, ``<metric>_<N>steps`` (``distilled_fd_digits_1steps``),
  read from each point's wide quality table (:func:`pd_core.metrics.quality_table`); and a plot of the
  distilled sampler's FD against the step count, one line per point (log2 steps).
- A saved runs-table view ``pd-sweep-<sweep>`` filtered to the sweep's pipeline runs shows the grid values
  next to the distilled sampler's FD at every step count.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import pandas as pd

SWEEP_TAG = "pd.sweep"
SWEEP_KIND = "sweep"
VIEW_PREFIX = "pd-sweep-"
POINT_COLUMN = "point"
_NOT_METRICS = ("steps", "n_samples")


def point_tags(sweep: str, values: Mapping[str, str]) -> dict[str, str]:
    """The tags (and params) of a sweep point's pipeline run."""
    return {SWEEP_TAG: sweep, **{f"{SWEEP_TAG}.{key}": str(value) for key, value in values.items()}}


def view_id(sweep: str) -> str:
    """The saved runs-table view of a sweep."""
    return f"{VIEW_PREFIX}{sweep}"


def view_filter(sweep: str) -> str:
    """The runs-table filter of a sweep's pipeline runs."""
    return f"tags.`{SWEEP_TAG}` = '{sweep}' AND tags.`pd.kind` = 'pipeline'"


def per_step_columns(wide: pd.DataFrame) -> dict[str, float]:
    """A pipeline's wide quality table as one row: ``<metric>_<N>steps`` for every metric and step count
    with a value (empty cells are left out)."""
    row: dict[str, float] = {}
    for record in wide.to_dict(orient="records"):
        steps = int(record["steps"])
        for column, value in record.items():
            if column in _NOT_METRICS or value is None:
                continue
            number = float(value)
            if math.isfinite(number):
                row[f"{column}_{steps}steps"] = number
    return row


def comparison_table(points: Mapping[str, Mapping[str, str]],
                     tables: Mapping[str, pd.DataFrame | None]) -> pd.DataFrame:
    """One row per point (in ``points``' order): its name, its grid values, then ``per_step_columns`` of its
    quality table (a point without one has empty metric cells). Metric columns are ordered by metric, then
    by step count, fewest first."""
    rows = []
    for name, values in points.items():
        wide = tables.get(name)
        metrics = per_step_columns(wide) if wide is not None else {}
        rows.append({POINT_COLUMN: name, **values, **metrics})
    table = pd.DataFrame(rows)
    fields = list(dict.fromkeys(k for v in points.values() for k in v))
    metric_columns = [c for c in table.columns if c != POINT_COLUMN and c not in fields]
    return table[[POINT_COLUMN, *fields, *sorted(metric_columns, key=_metric_order)]]


def _metric_order(column: str) -> tuple[str, int]:
    stem, _, steps = column.rpartition("_")
    return stem, int(steps.removesuffix("steps")) if steps.removesuffix("steps").isdigit() else 0


def fd_columns(table: pd.DataFrame, *, fd_name: str, sampler: str = "distilled") -> dict[int, str]:
    """{step count: column} of ``sampler``'s ``fd_name`` in a comparison table, fewest steps first."""
    prefix = f"{sampler}_{fd_name}_"
    found = {int(c[len(prefix):-len("steps")]): c for c in table.columns
             if c.startswith(prefix) and c.endswith("steps") and c[len(prefix):-len("steps")].isdigit()}
    return dict(sorted(found.items()))


def fd_name_of(table: pd.DataFrame) -> str | None:
    """The FD metric a comparison table holds (``fd_digits``, ``fid``), from its distilled columns."""
    for column in table.columns:
        if column.startswith("distilled_"):
            metric = column[len("distilled_"):].rpartition("_")[0]
            if metric.startswith("fd_") or metric == "fid":
                return metric
    return None


def fd_plot_png(table: pd.DataFrame, *, fd_name: str, title: str) -> bytes:
    """PNG of the distilled sampler's ``fd_name`` against the step count (log2 axis), one line per point."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    columns = fd_columns(table, fd_name=fd_name)
    figure = Figure(figsize=(7, 4.5), dpi=110)
    axes = figure.add_subplot()
    for record in table.to_dict(orient="records"):
        xs = [n for n, c in columns.items() if _finite(record.get(c))]
        axes.plot(xs, [record[columns[n]] for n in xs], marker="o", label=str(record[POINT_COLUMN]))
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(columns), [str(n) for n in columns])
    axes.set_xlabel("sampling steps")
    axes.set_ylabel(f"{fd_name} (lower is better)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def view_columns(fields: Sequence[str], table: pd.DataFrame, *, fd_name: str) -> tuple[list[str], list[str]]:
    """The saved view's (params, metrics): the grid values, then the distilled sampler's FD at every step count
    the pipelines log it at (``distilled_fd_digits_1steps``, ...; tasks/report.py)."""
    params = [f"{SWEEP_TAG}.{f}" for f in fields]
    return params, list(fd_columns(table, fd_name=fd_name).values())
