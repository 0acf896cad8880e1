"""The quality report's text: the steps x sampler Markdown table of the headline metric, RESULTS.md (kept
hand-written part from ``## Notes`` on), the README's block between its ``quality:`` markers, and the
per-pipeline wall-time bullets the other benchmarks' reports share."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from benchmarks.quality.frames import LABELS, SAMPLERS, wide

README_START, README_END = "<!-- quality:start -->", "<!-- quality:end -->"
NOTES = "## Notes"  # RESULTS.md from this heading on is written by people and kept on every rebuild


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def headline_markdown(df: pd.DataFrame, *, metric: str, floor: float | None, n_samples: int,
                      gammas: Mapping[int, float]) -> str:
    """The steps x sampler table of the headline metric, with the floor in the caption."""
    w = wide(df, metric=metric)
    cols = [s for s in SAMPLERS if s in w.columns]
    lines = ["| steps | " + " | ".join(LABELS[c] for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for n, row in w.iterrows():
        cells = []
        for c in cols:
            cell = _fmt(row[c])
            if c == "teacher_stochastic" and cell and n in gammas:
                cell += f" (gamma {gammas[n]:g})"
            teacher = row.get("teacher_ddim", math.nan)
            if c == "distilled" and cell and not math.isnan(teacher) and row[c] < teacher:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    caption = (f"`{metric}` ({'FID' if metric == 'fid' else 'FD in our classifier feature space, not Inception FID'}),"
               f" lower is better, {n_samples} samples vs the 10k test split")
    if floor is not None:
        caption += f"; real-vs-real floor at the same N: {floor:.3g}"
    return "\n".join(lines) + "\n\n" + caption + "."


def with_notes(generated: str, *, old: str) -> str:
    """The generated RESULTS.md followed by the hand-written part of the old one (from ``## Notes`` on)."""
    notes = old.split(NOTES, 1)[1] if NOTES in old else ""
    return generated.rstrip("\n") + "\n" + (f"\n{NOTES}{notes}" if notes else "")


def replace_block(text: str, block: str, *, start: str, end: str) -> str | None:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced by ``block``; None without them."""
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block.strip()}\n{end}{rest.split(end, 1)[1]}"


def update_readme(readme: Path, block: str, *, start: str = README_START, end: str = README_END) -> None:
    """Replace the text between the README's markers (the quality block's by default; they must exist)."""
    text = replace_block(readme.read_text(), block, start=start, end=end)
    if text is None:
        raise SystemExit(f"error: {readme} lacks the markers {start} / {end}")
    readme.write_text(text)


def pipeline_wall_lines(walls: Mapping[str, Mapping]) -> list[str]:
    """One Markdown bullet per pipeline: the wall time of the run that did the work and of the latest run."""
    return [f"- `{name}`: the pipeline run that did the work took {d['longest_run_s']:.0f} s wall "
            f"(MLflow run {d['longest_run_id']}); the latest run {d['latest_run_s']:.0f} s."
            for name, d in walls.items()]


def readme_block(summary: Mapping, *, table: str) -> str:
    met = sum(c["met"] for c in summary["targets"])
    missed = [c["target"] for c in summary["targets"] if not c["met"]]
    teacher, floor = summary["teacher_ddim_at_start"], summary["floor_value"]
    near = (f"The teacher's {summary['start_steps']}-step DDIM scores {teacher:.3g}, {teacher / floor:.1f}x the "
            f"real-vs-real floor of {floor:.3g} at the same N. " if floor else "")
    return (f"Fashion-MNIST, preset `{summary['preset']}`, on this 2-core CPU machine "
            f"(`{summary['report_command']}`; details, commands, timings and notes in "
            f"[benchmarks/quality/RESULTS.md](benchmarks/quality/RESULTS.md)). Bold: the distilled sampler beats "
            f"the teacher's DDIM at the same number of steps. {near}Targets met: {met} of {len(summary['targets'])}"
            + (f" (missed: {'; '.join(missed)})" if missed else "") + ".\n\n"
            f"{table}\n\n![quality vs steps](benchmarks/quality/quality_vs_steps.png)")


def results_markdown(summary: Mapping, *, table: str, cfg, df: pd.DataFrame) -> str:
    """RESULTS.md: machine, commands, sample counts, seeds, wall times, the table, the targets."""
    preset, metric = summary["preset"], summary["metric"]
    t = summary["train_seconds"]
    lines = [f"# Quality vs sampling steps: `{preset}` (paper Fig. 4 / Table 2 at our scale)", "",
             "Produced by one command (from the repo root, venv active):", "",
             f"    {summary['report_command']}", "",
             "which runs these two pipelines (idempotent: a rerun trains and measures nothing) and then writes "
             "this file, `results.csv`, `results.json`, `quality_vs_steps.png` and `samples.png`:", ""]
    lines += [f"    {c}" for c in summary["commands"].values()]
    lines += ["", f"- **Machine:** {summary['machine']}; no GPU.",
              f"- **Metric:** `{metric}` = "
              + ("Inception FID" if metric == "fid" else "FD in our classifier's feature space (not Inception FID), "
                 f"a classifier with {summary['classifier_test_accuracy']:.2%} test accuracy, see "
                 "[CLASSIFIER.md](CLASSIFIER.md)")
              + f"; also `kid_*`, precision and recall in results.csv. {summary['n_samples']} samples per "
                f"measurement against the 10k test split, the same noise for every sampler (eval seed "
                f"{summary['eval_seed']}); pipeline seed {summary['pipeline_seed']}.",
              f"- **Floor:** real vs real at the same N ({summary['n_samples']} training images vs the test split): "
              + ", ".join(f"{k} {v:.4g}" for f in summary["floor"] for k, v in f.items()
                          if isinstance(v, float) and k not in ("seconds_per_image",)) + ".",
              f"- **Teacher stochastic sampler:** the best of gamma in {summary['stochastic_gammas']} at each N "
              "(chosen on the same metric; the chosen gamma is in the table).",
              f"- **Schedule:** teacher {cfg.teacher.updates} updates x {cfg.teacher.batch_size} images; "
              f"rounds {cfg.distill.start_steps} -> {cfg.distill.final_steps}, {cfg.distill.updates_per_round} updates "
              f"each ({cfg.distill.last_rounds_updates} for the 2- and 1-step rounds) x {cfg.distill.batch_size} "
              f"images; the fast ablation divides every round's updates by {cfg.distill.fast_factor}.", ""]
    lines += ["## Headline", "", table, "", "![quality vs steps](quality_vs_steps.png)", "",
              "![samples](samples.png)", "",
              f"The teacher's own {cfg.distill.start_steps}-step DDIM grid: "
              f"[teacher_{cfg.distill.start_steps}_steps.png](teacher_{cfg.distill.start_steps}_steps.png).", ""]
    lines += ["## Targets", "", "| target | distilled | teacher DDIM | floor | ratio | met |",
              "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {c['target']} | {_fmt(c['distilled'])} | {_fmt(c['teacher_ddim'])} | {_fmt(c.get('floor'))} | "
              f"{c['ratio']:.2f} | {'yes' if c['met'] else '**no**'} |" for c in summary["targets"]]
    runs = df[df.sampler.isin(SAMPLERS)]
    present = [s for s in SAMPLERS if s in set(runs.sampler)]
    threads = cfg.runtime.threads or "all"
    lines += ["", f"## Seconds per image (sampling, this CPU, batch of {cfg.eval.batch_size}, {threads} thread(s), "
              f"runtime.precision {cfg.runtime.precision})", "",
              "| steps | " + " | ".join(present) + " |", "|---:|" + "---:|" * len(present)]
    spi = runs.drop_duplicates(["sampler", "steps"]).pivot_table(index="steps", columns="sampler",
                                                                 values="seconds_per_image", aggfunc="first")
    spi = spi.reindex(columns=[s for s in SAMPLERS if s in spi.columns]).sort_index(ascending=False)
    lines += [f"| {n} | " + " | ".join(_fmt(v) for v in row.values) + " |" for n, row in spi.iterrows()]
    lines += ["", "## Wall times", "", "| pipeline | stage | training seconds |", "|---|---|---:|"]
    for name, stages in t.items():
        lines += [f"| {name} | {stage} | {f'{sec:.0f}' if sec is not None else 'imported'} |"
                  for stage, sec in stages.items()]
    lines += [""]
    lines += pipeline_wall_lines(summary["pipeline_wall_seconds"])
    lines.append("- Sampling seconds of the measurements in the table, summed over step "
                 "counts (the stochastic sampler's other gammas cost as much again each): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in summary["eval_seconds_of_table_measurements"].items()) + ".")
    return "\n".join(lines)
