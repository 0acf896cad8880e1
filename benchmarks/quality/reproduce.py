"""Reproduce the paper's central result at our scale (Fig. 4 / Table 2): quality vs sampling steps.

    python -m benchmarks.quality.reproduce                 # fmnist-cpu + the fast ablation (~80 min, 2 cores)
    python -m benchmarks.quality.reproduce --report-only   # rebuild the results from a finished store

Runs the real pipeline twice through the ``pd`` command (Prefect's ephemeral API, MLflow on sqlite,
checkpoints in a local store under ``--work``):

1. ``pd run --preset P``: teacher, teacher baselines (DDIM and the stochastic sampler at every
   gamma, every step count of the chain), the rounds 2N -> N and each student's evaluation;
2. ``pd run --preset P --name P-fast --set distill.fast=true --teacher-uri <1's teacher>``: the same
   teacher (imported, so its measurements are reused from the store), every round with
   ``updates // distill.fast_factor`` updates (the paper's 50k-vs-10k ablation).

Both are idempotent: a rerun trains nothing and re-measures nothing. Then it writes, to ``--out``:
``results.csv`` (long format: preset, sampler, steps, metric, value, n_samples, seconds_per_image),
``results.json`` (floors, timings, commands, machine), ``quality_vs_steps.png`` (metric vs steps,
log-2 axis), ``samples.png`` (grids at 1, 2, 4, 8 steps: teacher DDIM vs distilled), RESULTS.md,
and the README's headline block between its ``quality:`` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from benchmarks.quality.frames import (
    LABELS,
    SAMPLERS,
    fd_metric,
    floor_value,
    results_frame,
    target_checks,
    wide,
)
from benchmarks.quality.plots import plot_grids, plot_quality
from pd_core import jobs
from pd_core.config import load_config
from pd_core.evaluation import classifier_key, floor_key, grid_key, records_prefix, teacher_step_counts, write_grid
from pd_core.malloc_env import with_malloc_tunables
from pd_core.store import CheckpointStore

OUT = Path(__file__).resolve().parent
REPO = OUT.parents[1]
README_START, README_END = "<!-- quality:start -->", "<!-- quality:end -->"
NOTES = "## Notes"  # RESULTS.md from this heading on is written by people and kept on every rebuild
GRID_STEPS = (1, 2, 4, 8)


# ------------------------------------------------------------------------------------------------
# Running the pipelines


def pipeline_commands(*, preset: str, work: Path, teacher_uri: str | None = None) -> dict[str, list[str]]:
    """The two ``pd run`` command lines (main and fast ablation), with the work folder made absolute.

    ``teacher_uri``: the main pipeline imports this teacher (e.g. one trained by teacher_curve.py with the
    preset's settings) instead of training its own.
    """
    work = work.resolve()
    common = ["--storage", str(work / "store"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    teacher = f"file://{work / 'store'}/{jobs.teacher_key(preset)}"
    imported = ["--teacher-uri", teacher_uri] if teacher_uri else []
    return {
        "distilled": ["pd", "run", "--preset", preset, *imported, *common],
        "distilled_fast": ["pd", "run", "--preset", preset, "--name", f"{preset}-fast", "--set", "distill.fast=true",
                           "--teacher-uri", teacher, *common],
    }


def run_pipelines(commands: Mapping[str, list[str]], *, log_dir: Path) -> None:
    """Run each command, its output teed to ``log_dir/<sampler>.log``; stop at the first failure."""
    env = with_malloc_tunables({**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    log_dir.mkdir(parents=True, exist_ok=True)
    for sampler, cmd in commands.items():
        log_path = log_dir / f"{sampler}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}  (log: {log_path})", flush=True)
        t0 = time.perf_counter()
        # `pd` of this interpreter's environment, also when that environment is not on PATH
        exe = shutil.which(cmd[0]) or str(Path(sys.executable).with_name(cmd[0]))
        with open(log_path, "a") as log:
            proc = subprocess.Popen([exe, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=env)
            assert proc.stdout is not None
            for line in proc.stdout:  # the pipeline's own progress lines (rate, ETA) pass through
                log.write(line)
                log.flush()
                sys.stdout.write(line)
            rc = proc.wait()
        print(f"[{time.strftime('%H:%M:%S')}] exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            raise SystemExit(f"error: {shlex.join(cmd)} exited {rc}; see {log_path} (rerun resumes where it stopped)")


# ------------------------------------------------------------------------------------------------
# Collecting records from the store


def checkpoint_keys(cfg, *, pipeline: str) -> dict[int, str]:
    """Step count -> checkpoint key of a pipeline: the teacher at ``distill.start_steps``, then each round's student."""
    return {cfg.distill.start_steps: jobs.teacher_key(pipeline),
            **{s: jobs.round_key(pipeline, round_index=i, student_steps=s)
               for i, (_, s) in enumerate(cfg.distill.rounds(), start=1)}}


def classifier_manifest(store: CheckpointStore, cfg) -> dict:
    """The manifest of the feature classifier the pipelines used (cached in the store by the first one)."""
    key = classifier_key(cfg)
    manifest = store.read_manifest(key)
    if manifest is None:
        raise SystemExit(f"error: no feature classifier at {store.uri(key)}; run the pipelines first")
    return manifest


def pipeline_wall_lines(walls: Mapping[str, Mapping]) -> list[str]:
    """One Markdown bullet per pipeline: the wall time of the run that did the work and of the latest run."""
    return [f"- `{name}`: the pipeline run that did the work took {d['longest_run_s']:.0f} s wall "
            f"(MLflow run {d['longest_run_id']}); the latest run {d['latest_run_s']:.0f} s."
            for name, d in walls.items()]


def records_of(store: CheckpointStore, cfg, *, pipeline: str) -> list[dict]:
    """Every evaluation record of a finished pipeline's checkpoints (from the sha256-keyed caches)."""
    return records_at(store, checkpoint_keys(cfg, pipeline=pipeline).values())


def records_at(store: CheckpointStore, keys: Iterable[str]) -> list[dict]:
    """Every evaluation record of the complete checkpoints at ``keys`` (SystemExit naming one that is not)."""
    out = []
    for key in keys:
        manifest = store.read_manifest(key)
        if manifest is None:
            raise SystemExit(f"error: {store.uri(key)} is not a complete checkpoint; run without --report-only first")
        out += [json.loads(store.get_bytes(k)) for k in store.list(records_prefix(manifest["sha256"]))
                if k.endswith(".json")]
    return out


# ------------------------------------------------------------------------------------------------
# Text


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


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the README's quality markers (they must exist)."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"error: {readme} lacks the markers {README_START} / {README_END}")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{block.strip()}\n{README_END}{tail}")


# ------------------------------------------------------------------------------------------------


def pipeline_durations(tracking_uri: str, *, pipelines: Sequence[str]) -> dict[str, dict]:
    """Wall time of each pipeline's longest MLflow parent run (the one that trained) and of its latest."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("progressive-distillation")
    out: dict[str, dict] = {}
    if exp is None:
        return out
    for name in pipelines:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`pd.pipeline` = '{name}' and "
                                                                    f"tags.`pd.kind` = 'pipeline'")
        done = [r for r in runs if r.info.end_time]
        if done:
            longest = max(done, key=lambda r: r.info.end_time - r.info.start_time)
            latest = max(done, key=lambda r: r.info.start_time)
            out[name] = {"longest_run_s": round((longest.info.end_time - longest.info.start_time) / 1000, 1),
                         "longest_run_id": longest.info.run_id,
                         "latest_run_s": round((latest.info.end_time - latest.info.start_time) / 1000, 1)}
    return out


def report_command(*, preset: str, work: Path, teacher_uri: str | None, overrides: Sequence[str] = (),
                   module: str = "benchmarks.quality.reproduce", default_work: Path = REPO / "runs" / "quality") -> str:
    """The reproduce command line that made a report (default options left out; $PWD for the repo)."""
    args = ["python", "-m", module, "--preset", preset, *[arg for o in overrides for arg in ("--set", o)]]
    if Path(work).resolve() != Path(default_work).resolve():
        args += ["--work", str(work)]
    if teacher_uri:
        args += ["--teacher-uri", teacher_uri]
    return shlex.join(args).replace(str(REPO), "$PWD").replace("'", '"')  # double quotes: $PWD stays expandable


def build_report(*, preset: str, work: Path, out: Path, readme: Path | None, teacher_uri: str | None = None) -> dict:
    from benchmarks.speed.common import machine

    work = work.resolve()
    commands = pipeline_commands(preset=preset, work=work, teacher_uri=teacher_uri)
    store = CheckpointStore(str(work / "store"))
    cfg = load_config(preset=preset)
    fast_name = f"{preset}-fast"
    main, fast = records_of(store, cfg, pipeline=preset), records_of(store, cfg, pipeline=fast_name)
    classifier = classifier_manifest(store, cfg)
    floor_at = floor_key(cfg, extractor_id=classifier["sha256"])  # this evaluation's floor
    floors = [json.loads(store.get_bytes(floor_at))] if store.exists(floor_at) else []
    df = results_frame(preset=preset, main=main, fast=fast, floor=floors[0] if floors else None)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    metric = fd_metric(df)
    n_samples = int(df["n_samples"].max())
    floor = floor_value(df, metric=metric)
    gamma_rows = df[(df.sampler == "teacher_stochastic") & (df.metric == "gamma")]
    gammas = {int(r.steps): float(r.value) for r in gamma_rows.itertuples()}
    w = wide(df, metric=metric)
    checks = target_checks(w, start_steps=cfg.distill.start_steps, floor=floor)

    plot_quality(df, metric=metric, floor=floor, path=out / "quality_vs_steps.png",
                 title=f"{preset}: {n_samples} samples, lower is better")
    grids = {}
    keys = checkpoint_keys(cfg, pipeline=preset)
    teacher = keys[cfg.distill.start_steps]
    for n in GRID_STEPS:  # the teacher's N-step grids are cheap (64 images): made here if missing
        write_grid(cfg, store, key=teacher, sampler="ddim", steps=n)
        grids[("teacher_ddim", n)] = store.get_bytes(grid_key(teacher, sampler="ddim", steps=n))
        if n in keys and keys[n] != teacher:
            grids[("distilled", n)] = store.get_bytes(grid_key(keys[n], sampler="ddim", steps=n))
    plot_grids(grids, steps=GRID_STEPS, path=out / "samples.png",
               title=f"{preset}: the same noise for every panel (eval seed {cfg.eval.seed})")
    teacher_grid = store.get_bytes(grid_key(teacher, sampler="ddim", steps=cfg.distill.start_steps))
    (out / f"teacher_{cfg.distill.start_steps}_steps.png").write_bytes(teacher_grid)

    timings = {}
    for name in (preset, fast_name):
        timings[name] = {k.rsplit("/", 1)[-1]: store.read_manifest(k).get("train_seconds")
                         for k in checkpoint_keys(cfg, pipeline=name).values()}
    durations = pipeline_durations(f"sqlite:///{work / 'mlflow.db'}", pipelines=(preset, fast_name))
    # sampling + features of the measurements in the table (the stochastic sampler's other gammas not included)
    eval_seconds = {s: round(float((g.drop_duplicates("steps")["seconds_per_image"] * n_samples).sum()), 1)
                    for s, g in df[df.sampler.isin(SAMPLERS)].groupby("sampler")}
    # shown with $PWD for the repository, so they read (and run) the same on any checkout
    shown = {k: shlex.join(v).replace(str(REPO), "$PWD").replace("'", '"') for k, v in commands.items()}
    summary = {"preset": preset, "machine": machine(), "commands": shown,
               "report_command": report_command(preset=preset, work=work, teacher_uri=teacher_uri),
               "metric": metric, "n_samples": n_samples, "start_steps": cfg.distill.start_steps,
               "teacher_ddim_at_start": float(w.at[cfg.distill.start_steps, "teacher_ddim"]), "floor_value": floor,
               "classifier_test_accuracy": classifier.get("test_accuracy"), "eval_seed": cfg.eval.seed,
               "pipeline_seed": cfg.pipeline.seed,
               "floor": floors, "stochastic_gammas": list(cfg.eval.stochastic_gammas),
               "best_gamma": gammas, "targets": checks, "train_seconds": timings,
               "pipeline_wall_seconds": durations, "eval_seconds_of_table_measurements": eval_seconds,
               "teacher_step_counts": teacher_step_counts(cfg)}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    table = headline_markdown(df, metric=metric, floor=floor, n_samples=n_samples, gammas=gammas)
    results_md = out / "RESULTS.md"
    old = results_md.read_text() if results_md.exists() else ""
    results_md.write_text(with_notes(results_markdown(summary, table=table, cfg=cfg, df=df), old=old))
    if readme is not None:
        update_readme(readme, readme_block(summary, table=table))
    return summary


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fmnist-cpu")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "quality", help="store, MLflow db and logs")
    p.add_argument("--out", type=Path, default=OUT, help="where the results files go")
    p.add_argument("--report-only", action="store_true", help="do not run the pipelines; rebuild from the store")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    p.add_argument("--teacher-uri", help="the main pipeline imports this teacher instead of training one")
    args = p.parse_args(argv)
    if not args.report_only:
        run_pipelines(pipeline_commands(preset=args.preset, work=args.work, teacher_uri=args.teacher_uri),
                      log_dir=args.work.resolve() / "logs")
    summary = build_report(preset=args.preset, work=args.work, out=args.out, teacher_uri=args.teacher_uri,
                           readme=None if args.no_readme else REPO / "README.md")
    for c in summary["targets"]:
        print(f"{'met ' if c['met'] else 'MISS'}  {c['target']}: ratio {c['ratio']:.3g}")
    print(f"wrote {args.out}/results.csv, results.json, RESULTS.md, quality_vs_steps.png, samples.png")


if __name__ == "__main__":
    main()
