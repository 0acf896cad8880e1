"""The GPU run's verdicts and text: the issue's targets, RESULTS.md and the README block.

Targets (FD in our classifier's feature space, never Inception FID; lower is better):
- the teacher's DDIM at its start steps within 3x of the real-vs-real floor at the same N;
- the distilled 4-step sampler within 1.2x of the teacher's DDIM at its start steps (same N);
- the distilled sampler below the teacher's DDIM at every N <= 8 (the pipeline's N);
- MFU >= 40% for the bf16 or bf16+compile teacher update of the paper's CIFAR-10 U-Net (the better of the two).
Every check carries its numbers; a target whose numbers are missing is reported as not measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from benchmarks.gpu.quality import FLOOR
from benchmarks.quality.report_text import headline_markdown

TEACHER_FLOOR_LIMIT = 3.0
FOUR_STEP_LIMIT = 1.2
MFU_TARGET = 0.40
TARGET_NAMES = (f"teacher DDIM at its start steps within {TEACHER_FLOOR_LIMIT:g}x of the real-data floor",
                f"distilled 4-step within {FOUR_STEP_LIMIT:g}x of the teacher DDIM at its start steps",
                "distilled below teacher DDIM at every N <= 8",
                f"MFU >= {MFU_TARGET:.0%} for the bf16(+compile) teacher update")


def fd_metric(df: pd.DataFrame) -> str | None:
    """The headline metric: ``fid`` where present, else the offline ``fd_*``; None without rows."""
    names = list(dict.fromkeys(df["metric"])) if len(df) else []
    return "fid" if "fid" in names else next((m for m in names if m.startswith("fd")), None)


def value_at(df: pd.DataFrame, *, sampler: str, metric: str, n_samples: int, steps: int | None = None) -> float | None:
    """The value of one row (steps None: the floor's), or None when the run has no such row."""
    rows = df[(df["sampler"] == sampler) & (df["metric"] == metric) & (df["n_samples"] == n_samples)]
    rows = rows[rows["steps"].isna()] if steps is None else rows[rows["steps"] == steps]
    return float(rows["value"].iloc[0]) if len(rows) else None


def _check(target: str, *, value: float | None, reference: float | None, limit: float, at_most: bool,
           strict: bool = False) -> dict:
    """value / reference against ``limit``: at most (below it when ``strict``) or at least; met is None when a
    number is missing."""
    if value is None or reference is None or reference == 0:
        return {"target": target, "value": value, "reference": reference, "ratio": None, "limit": limit, "met": None}
    ratio = value / reference
    met = (ratio < limit if strict else ratio <= limit) if at_most else ratio >= limit
    return {"target": target, "value": value, "reference": reference, "ratio": ratio, "limit": limit,
            "met": bool(met)}


def target_checks(quality: pd.DataFrame, speed: Mapping[str, float], *, start_steps: int, n_samples: int,
                  large_n: int | None) -> list[dict]:
    """The issue's targets at the pipeline's N (and the first two again at ``large_n``), then the MFU target."""
    metric = fd_metric(quality)
    checks = []
    for n in [n_samples] + ([large_n] if large_n else []):
        at = f" (N={n})"
        teacher = value_at(quality, sampler="teacher_ddim", metric=metric, n_samples=n, steps=start_steps) \
            if metric else None
        floor = value_at(quality, sampler=FLOOR, metric=metric, n_samples=n) if metric else None
        four = value_at(quality, sampler="distilled", metric=metric, n_samples=n, steps=4) if metric else None
        checks.append(_check(TARGET_NAMES[0] + at, value=teacher, reference=floor, limit=TEACHER_FLOOR_LIMIT,
                             at_most=True))
        checks.append(_check(TARGET_NAMES[1] + at, value=four, reference=teacher, limit=FOUR_STEP_LIMIT,
                             at_most=True))
    main = quality[(quality["n_samples"] == n_samples) & (quality["metric"] == metric)] if metric else quality[:0]
    steps = sorted({int(s) for s in main.loc[main["sampler"] == "distilled", "steps"] if s <= 8}, reverse=True)
    for s in steps or [None]:
        distilled = value_at(quality, sampler="distilled", metric=metric, n_samples=n_samples, steps=s) \
            if s is not None else None
        teacher = value_at(quality, sampler="teacher_ddim", metric=metric, n_samples=n_samples, steps=s) \
            if s is not None else None
        name = f"distilled below teacher DDIM at N={s} steps" if s is not None else TARGET_NAMES[2]
        checks.append(_check(name, value=distilled, reference=teacher, limit=1.0, at_most=True, strict=True))
    mfu = [v for k, v in speed.items() if k in ("mfu_teacher_bf16", "mfu_teacher_bf16_compile")]
    checks.append(_check(TARGET_NAMES[3], value=max(mfu) if mfu else None, reference=MFU_TARGET, limit=1.0,
                         at_most=False))
    return checks


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def targets_markdown(checks: Sequence[Mapping]) -> str:
    """| target | value | reference | ratio | met |, with "not measured" where a number is missing."""
    lines = ["| target | value | reference | ratio | met |", "|---|---:|---:|---:|---|"]
    for c in checks:
        met = "not measured" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['target']} | {_fmt(c['value'])} | {_fmt(c['reference'])} | {_fmt(c['ratio'], '.2f')} | "
                     f"{met} |")
    return "\n".join(lines)


def speed_markdown(speed: Mapping[str, float], units: Mapping[str, str]) -> str:
    """The speed rows as a table, in the order measured."""
    lines = ["| benchmark | value | unit |", "|---|---:|---|"]
    lines += [f"| `{name}` | {_fmt(value, '.4g')} | {units.get(name, '')} |" for name, value in speed.items()]
    return "\n".join(lines)


def large_n_markdown(quality: pd.DataFrame, *, metric: str, large_n: int) -> str:
    """The end points at the larger N, each with its ratio to the floor at that N."""
    floor = value_at(quality, sampler=FLOOR, metric=metric, n_samples=large_n)
    rows = quality[(quality["n_samples"] == large_n) & (quality["metric"] == metric) & (quality["sampler"] != FLOOR)]
    lines = [f"| sampler | steps | `{metric}` | over the floor |", "|---|---:|---:|---:|"]
    for r in rows.itertuples():
        ratio = r.value / floor if floor else None
        lines.append(f"| {r.sampler} | {r.steps} | {_fmt(r.value)} | {_fmt(ratio, '.2f')} |")
    return "\n".join(lines) + f"\n\nReal-vs-real floor at N={large_n}: {_fmt(floor)}."


def main_table(quality: pd.DataFrame, *, summary: Mapping) -> str:
    """The steps x sampler table at the pipeline's N (report_text.headline_markdown), or a line when there is none."""
    q = summary.get("quality") or {}
    metric, n = q.get("metric"), q.get("n_samples")
    main = quality[quality["n_samples"] == n] if n is not None else quality[:0]
    if metric is None or main.empty:
        return "No quality measurements: the quality part did not finish (see the parts above)."
    floor = value_at(quality, sampler=FLOOR, metric=metric, n_samples=n)
    gammas = {int(k): float(v) for k, v in (q.get("best_gamma") or {}).items()}
    return headline_markdown(main[main["sampler"] != FLOOR], metric=metric, floor=floor, n_samples=n, gammas=gammas)


def schedule_line(q: Mapping) -> str:
    """What was trained, and whether the fit changed the preset's counts (with the rates it was fitted to)."""
    sched, fit, costs = q.get("schedule") or {}, q.get("fit") or {}, q.get("costs") or {}
    if not sched:
        return "- **Schedule:** not reached (the part stopped before training)."
    rounds = ", ".join(f"{n} steps {u}" for n, u in sched["round_updates"].items())
    how = (f"the preset's counts scaled by {fit.get('scale')} to fit the budget" if q.get("fit_applied")
           else "the preset's counts as written")
    rates = (f"teacher update {costs['teacher_update_s'] * 1e3:.1f} ms, distillation update "
             f"{costs['distill_update_s'] * 1e3:.1f} ms, {costs['forwards_per_s']:.0f} network calls/s in evaluation"
             if costs else "not measured")
    predicted = ", ".join(f"{k} {v:.0f}" for k, v in (fit.get("predicted_s") or {}).items())
    return (f"- **Schedule:** teacher {sched['teacher_updates']} updates x {sched['teacher_batch']} images; rounds "
            f"to {rounds} updates x {sched['distill_batch']} images ({how}; measured rates: {rates}; predicted "
            f"seconds: {predicted}).")


def results_markdown(summary: Mapping, *, quality: pd.DataFrame, units: Mapping[str, str]) -> str:
    """benchmarks/gpu/RESULTS.md (the generated part): machine, command, parts, speed, quality, targets, timings."""
    q = summary.get("quality") or {}
    lines = [f"# On a GPU: `{summary['device']}`", "",
             "Produced by one run of the prepared script (benchmarks/gpu/README.md) and merged with "
             "`python -m benchmarks.gpu.merge OUT`:", "", f"    {summary['command']}", "",
             f"- **Machine:** {summary['device']} (CUDA {summary.get('cuda')}); host {summary['machine']}; "
             f"started {summary['started']}.",
             "- **Parts:** " + "; ".join(f"{name} {p['status']} in {p['seconds']:.0f} s"
                                         + (f" ({p['error']})" if p.get("error") else "")
                                         for name, p in summary["parts"].items()) + ".", ""]
    lines += ["## Targets", "", targets_markdown(summary.get("targets", [])), ""]
    lines += ["## Speed: the paper's CIFAR-10 U-Net, batch 128", "",
              speed_markdown(summary.get("speed", {}), units) if summary.get("speed") else "Not measured.", ""]
    lines += [f"## Quality: `{q.get('preset', 'fmnist-gpu')}`", "", main_table(quality, summary=summary), ""]
    if q.get("metric") and q.get("large_n") and (quality["n_samples"] == q["large_n"]).any():
        lines += [f"End points at N={q['large_n']}:", "", large_n_markdown(quality, metric=q["metric"],
                                                                          large_n=q["large_n"]), ""]
    if q:
        lines += ["![quality vs steps](quality_vs_steps.png)", "", "![samples](samples.png)", "",
                  f"- **Metric:** `{q.get('metric')}` = FD in our classifier's feature space (not Inception FID); "
                  f"the classifier was trained in this run with fmnist-cpu's recipe "
                  f"(test accuracy {_fmt((q.get('classifier') or {}).get('test_accuracy'), '.2%')}, "
                  f"sha256 {str((q.get('classifier') or {}).get('sha256'))[:12]}). N = {q.get('n_samples')} as "
                  f"the CPU results (fmnist-cpu: {q.get('cpu_preset_n_samples')}), {q.get('large_n')} at the end "
                  "points, each with its floor at the same N.",
                  schedule_line(q),
                  "- **Wall seconds per phase:** "
                  + ", ".join(f"{k} {v:.0f}" for k, v in (q.get("seconds") or {}).items()) + "."]
    return "\n".join(lines) + "\n"


def readme_block(summary: Mapping, *, quality: pd.DataFrame) -> str:
    """The README's GPU paragraph after a merged run: the targets and the table, with links."""
    checks = summary.get("targets", [])
    met = sum(1 for c in checks if c["met"])
    measured = sum(1 for c in checks if c["met"] is not None)
    return (f"One run of the prepared script on one `{summary['device']}` ({summary['started']}; details in "
            f"[benchmarks/gpu/RESULTS.md](benchmarks/gpu/RESULTS.md)). Targets met: {met} of {measured} measured."
            f"\n\n{main_table(quality, summary=summary)}\n\n{targets_markdown(checks)}")
