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
import shlex
from pathlib import Path

from benchmarks.quality.frames import SAMPLERS, fd_metric, floor_value, results_frame, target_checks, wide
from benchmarks.quality.plots import plot_grids, plot_quality
from benchmarks.quality.records import checkpoint_keys, classifier_manifest, records_of
from benchmarks.quality.report_text import headline_markdown, readme_block, results_markdown, update_readme, with_notes
from benchmarks.quality.runs import REPO, pipeline_commands, pipeline_durations, report_command, run_pipelines
from pd_core.config import load_config
from pd_core.evaluation import floor_key, grid_key, teacher_step_counts, write_grid
from pd_core.store import CheckpointStore

OUT = Path(__file__).resolve().parent
GRID_STEPS = (1, 2, 4, 8)


def build_report(*, preset: str, work: Path, out: Path, readme: Path | None, teacher_uri: str | None = None) -> dict:
    """Every results file, in ``out``, from the store and MLflow db the two pipelines wrote under ``work`` (and
    the README's block when ``readme`` is given); returns results.json's content."""
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
