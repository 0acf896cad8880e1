"""The quality benchmark's results as frames: the long results.csv rows, the wide steps x sampler table and
the issue's target verdicts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from pd_core.metrics import quality_long

COLUMNS = ["preset", "sampler", "steps", "metric", "value", "n_samples", "seconds_per_image"]
SAMPLERS = ("teacher_ddim", "teacher_stochastic", "distilled", "distilled_fast")
FLOOR_SAMPLER = "real_data_floor"  # results.csv rows of the real-vs-real floor at the same N (steps empty)
LABELS = {"teacher_ddim": "teacher, DDIM", "teacher_stochastic": "teacher, stochastic (best gamma)",
          "distilled": "distilled", "distilled_fast": "distilled, 5x fewer updates"}


def results_frame(*, preset: str, main: Sequence[Mapping], fast: Sequence[Mapping],
                  floor: Mapping | None = None) -> pd.DataFrame:
    """Long results: teacher rows and distilled rows of the main pipeline, distilled rows of the fast one
    renamed ``distilled_fast`` (best gamma per step count), then the real-vs-real ``floor`` record at the
    same N as sampler ``real_data_floor`` with empty steps and seconds per image."""
    rows = [r for r in main if r["sampler"] in ("teacher_ddim", "teacher_stochastic", "distilled")]
    rows += [{**r, "sampler": "distilled_fast"} for r in fast if r["sampler"] == "distilled"]
    if not rows:
        raise ValueError("no evaluation records: did the pipelines run with eval.enabled=true?")
    long = quality_long(rows)
    order = {s: i for i, s in enumerate(SAMPLERS)}
    long = long.sort_values(["sampler", "steps", "metric"], key=lambda c: c.map(order) if c.name == "sampler" else c)
    if floor is not None:
        floor_rows = quality_long([{**floor, "sampler": FLOOR_SAMPLER, "steps": None, "seconds_per_image": None}])
        long = pd.concat([long, floor_rows.sort_values("metric")], ignore_index=True)
    long.insert(0, "preset", preset)
    long["steps"] = long["steps"].astype("Int64")
    return long[COLUMNS].reset_index(drop=True)


def floor_value(df: pd.DataFrame, *, metric: str) -> float | None:
    """The real-data floor of ``metric`` in a results frame (None when it has no floor rows)."""
    rows = df[(df["sampler"] == FLOOR_SAMPLER) & (df["metric"] == metric)]
    return float(rows["value"].iloc[0]) if len(rows) else None


def fd_metric(df: pd.DataFrame) -> str:
    """The headline metric: ``fid`` where present, else the offline ``fd_*`` (FD in our classifier's features)."""
    names = list(dict.fromkeys(df["metric"]))
    return next((m for m in names if m == "fid"), None) or next(m for m in names if m.startswith("fd"))


def wide(df: pd.DataFrame, *, metric: str) -> pd.DataFrame:
    """steps x sampler table of one metric (NaN where a sampler has no such step count); floor rows left out."""
    rows = df[(df["metric"] == metric) & df["sampler"].isin(SAMPLERS)].astype({"steps": "int64"})
    w = rows.pivot_table(index="steps", columns="sampler", values="value", aggfunc="first")
    return w.reindex(columns=[s for s in SAMPLERS if s in w.columns]).sort_index(ascending=False)


FLOOR_FACTOR = 4.0  # the teacher at its start steps within this many times the real-data floor
DISTILLED_4_FACTOR = 1.2  # the distilled 4-step sampler within this many times the teacher at its start steps


def target_checks(w: pd.DataFrame, *, start_steps: int, floor: float | None) -> list[dict]:
    """The issue's targets, each with its numbers and a verdict (lower metric is better): the teacher near the
    data, distilled below teacher DDIM at every N <= 8, distilled 4-step near the teacher at its start steps."""
    checks = []
    if floor is not None and start_steps in w.index:
        t0 = w.at[start_steps, "teacher_ddim"]
        checks.append({"target": f"teacher DDIM at {start_steps} steps within {FLOOR_FACTOR:g}x of the real-data "
                                 f"floor", "distilled": None, "teacher_ddim": t0, "floor": floor,
                       "ratio": t0 / floor, "met": bool(t0 <= FLOOR_FACTOR * floor)})
    for n in sorted((s for s in w.index if s <= 8), reverse=True):
        d, t = w.at[n, "distilled"], w.at[n, "teacher_ddim"]
        if not (math.isnan(d) or math.isnan(t)):
            checks.append({"target": f"distilled beats teacher DDIM at N={n}", "distilled": d, "teacher_ddim": t,
                           "ratio": d / t, "met": bool(d < t)})
    if 4 in w.index and start_steps in w.index:
        d4, t0 = w.at[4, "distilled"], w.at[start_steps, "teacher_ddim"]
        checks.append({"target": f"distilled 4-step within {DISTILLED_4_FACTOR:g}x of teacher DDIM at {start_steps} "
                                 f"steps", "distilled": d4, "teacher_ddim": t0, "ratio": d4 / t0,
                       "met": bool(d4 <= DISTILLED_4_FACTOR * t0)})
    return checks
