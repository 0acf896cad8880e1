"""The quality-vs-steps table from simple per-(sampler, steps) records.

A record is a flat dict, one per evaluated (sampler, steps[, gamma]):
    {"sampler": "teacher_ddim" | "teacher_stochastic" | "distilled" | "floor" | ...,
     "steps": 8,                 # None for "floor" (real vs real, no sampler)
     "gamma": 0.3,               # optional: the stochastic sampler's variance coefficient
     "w": 2.0,                   # optional: the guidance weight of a class-conditional model
     "n_samples": 10000, "seconds_per_image": 0.012,
     "fd_fashion_mnist": 3.1, "kid_fashion_mnist": 0.002, ...}   # metrics: every other key
A sampler evaluated at several gammas for one step count keeps the best one (lowest FD). Records
with a guidance weight are kept apart per w: (sampler, steps, w) is the key, the wide table names
their columns ``<sampler>_w<w>_...`` and the long table gains a ``w`` column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

FLOOR = "floor"
META_KEYS = ("sampler", "steps", "gamma", "w", "n_samples", "seconds_per_image")
LONG_COLUMNS = ["sampler", "steps", "metric", "value", "n_samples", "seconds_per_image"]
GUIDED_LONG_COLUMNS = ["sampler", "steps", "w", "metric", "value", "n_samples", "seconds_per_image"]


def _metrics(record: Mapping) -> dict[str, float]:
    """Every numeric non-meta entry (strings such as a checkpoint URI are carried by the caller, not the table)."""
    return {k: float(v) for k, v in record.items()
            if k not in META_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def default_select_metric(rows: Sequence[Mapping]) -> str:
    """The metric that picks the best gamma: ``fid`` if present, else the first ``fd_*``, else the first metric."""
    names = [k for r in rows for k in _metrics(r)]
    for name in names:
        if name == "fid":
            return name
    for name in names:
        if name.startswith("fd_"):
            return name
    if not names:
        raise ValueError("records carry no metrics")
    return names[0]


def select_best(rows: Sequence[Mapping], *, metric: str | None = None) -> list[Mapping]:
    """One record per (sampler, steps): the lowest ``metric`` among several gammas; floors kept as they are."""
    metric = metric or default_select_metric(rows)
    best: dict[tuple, Mapping] = {}
    for r in rows:
        if "sampler" not in r:
            raise ValueError(f"record without 'sampler': {dict(r)}")
        key = (r["sampler"], r.get("steps"), r.get("w"), r.get("n_samples") if r["sampler"] == FLOOR else None)
        score = _metrics(r).get(metric, math.inf)
        if key not in best or score < _metrics(best[key]).get(metric, math.inf):
            best[key] = r
    return list(best.values())


def _floor_for(floors: list[Mapping], n_samples: int | None) -> Mapping | None:
    """The floor measured at the row's N (or the only floor there is)."""
    same_n = [f for f in floors if f.get("n_samples") == n_samples]
    return same_n[0] if same_n else (floors[0] if len(floors) == 1 else None)


def _column_sampler(record: Mapping) -> str:
    """A record's sampler as the wide table names it: ``teacher_ddim``, or ``teacher_ddim_w2`` at w = 2."""
    w = record.get("w")
    return record["sampler"] if w is None else f"{record['sampler']}_w{float(w):g}"


def quality_table(rows: Sequence[Mapping], *, select_metric: str | None = None) -> pd.DataFrame:
    """Wide table, one row per step count (ascending):
    steps, n_samples, <sampler>_<metric>..., <sampler>_gamma (when tuned), <sampler>_seconds_per_image,
    floor_<metric>... (the real-vs-real floor at the row's N); a guided sampler is ``<sampler>_w<w>``.
    """
    chosen = select_best(rows, metric=select_metric)
    floors = [r for r in chosen if r["sampler"] == FLOOR]
    runs = [{**r, "sampler": _column_sampler(r)} for r in chosen if r["sampler"] != FLOOR]
    samplers = list(dict.fromkeys(r["sampler"] for r in runs))
    tuned = {r["sampler"] for r in runs if r.get("gamma") is not None}
    metric_names = list(dict.fromkeys(k for r in runs for k in _metrics(r)))
    columns = ["steps", "n_samples"]
    for s in samplers:
        columns += [f"{s}_{m}" for m in metric_names] + ([f"{s}_gamma"] if s in tuned else [])
        columns.append(f"{s}_seconds_per_image")
    floor_metrics = list(dict.fromkeys(k for r in floors for k in _metrics(r)))
    columns += [f"floor_{m}" for m in floor_metrics]

    table = []
    for steps in sorted({int(r["steps"]) for r in runs}):
        at = [r for r in runs if int(r["steps"]) == steps]
        n = max((r.get("n_samples") or 0 for r in at), default=0) or None
        row: dict[str, object] = {"steps": steps, "n_samples": n}
        for r in at:
            s = r["sampler"]
            row.update({f"{s}_{m}": v for m, v in _metrics(r).items()})
            row[f"{s}_seconds_per_image"] = r.get("seconds_per_image")
            if s in tuned:
                row[f"{s}_gamma"] = r.get("gamma")
        floor = _floor_for(floors, n)
        if floor is not None:
            row.update({f"floor_{m}": v for m, v in _metrics(floor).items()})
        table.append(row)
    df = pd.DataFrame(table, columns=columns)
    return df.astype({"steps": "int64", "n_samples": "Int64"})


def quality_long(rows: Sequence[Mapping], *, select_metric: str | None = None) -> pd.DataFrame:
    """Long format for logging and plotting: columns sampler, steps, metric, value, n_samples, seconds_per_image,
    and ``w`` after steps when any record has a guidance weight (<NA> for those without).

    Best gamma only (see :func:`select_best`); a tuned sampler's gamma appears as metric ``gamma``.
    Floor rows have steps <NA>.
    """
    out = []
    chosen = select_best(rows, metric=select_metric)
    guided = any(r.get("w") is not None for r in chosen)
    for r in chosen:
        base = {"sampler": r["sampler"], "steps": r.get("steps"), "w": r.get("w"), "n_samples": r.get("n_samples"),
                "seconds_per_image": r.get("seconds_per_image")}
        values = _metrics(r) | ({"gamma": float(r["gamma"])} if r.get("gamma") is not None else {})
        out += [{**base, "metric": m, "value": v} for m, v in values.items()]
    df = pd.DataFrame(out, columns=GUIDED_LONG_COLUMNS if guided else LONG_COLUMNS)
    types = {"steps": "Int64", "n_samples": "Int64", "value": "float64", "seconds_per_image": "float64"}
    return df.astype({**types, "w": "Float64"} if guided else types)


def summary_view(wide: pd.DataFrame) -> pd.DataFrame:
    """The columns a terminal has room for: steps, each sampler's FD (or FID) and sample accuracy (conditional
    models), the tuned gamma, the floor's FD and the seconds per image of the distilled sampler. The full table
    stays in the CSV."""
    keep = [c for c in wide.columns
            if c == "steps" or c.endswith("_gamma") or c == "distilled_seconds_per_image"
            or c.endswith("_sample_accuracy")
            or ("_fd_" in c or c.startswith("fd_") or c.endswith("_fid")) and not c.endswith("_std")]
    return wide[keep]
