"""Guided distillation at our scale (Meng et al., CVPR 2023): FD and sample accuracy across the guidance weight w,
guided teacher against the distilled student.

    python -m benchmarks.guided.reproduce                  # fmnist-guided-cpu (~90 min on 2 idle cores)
    python -m benchmarks.guided.reproduce --report-only    # rebuild the results from a finished store

Runs the real pipeline through the ``pd`` command (Prefect's ephemeral API, MLflow on sqlite, a local store
under ``--work``): the class-conditional teacher with label dropout, its guided DDIM baselines (2 network calls
per step) at every N of the chain and every w of ``eval.guidance_weights``, ``guide-distill`` (stage 1, whose
student takes w: 1 call per step) and the rounds down to 1 step, each evaluated at every w on class-balanced
labels. Idempotent: a rerun trains and measures nothing. It then measures the students of 8, 4 and 2 steps with
the two-step stochastic sampler of Meng et al. too (cached in the store like every record) and writes, to
``--out``: ``results.csv`` (long format: preset, sampler, steps, w, metric, value, n_samples, seconds_per_image;
samplers ``teacher_ddim``, the guided teacher, ``distilled``, whose row at the start step count is the stage-1
student, and ``distilled_stochastic``), ``results.json``,
``fd_vs_accuracy.png``, ``samples.png`` (one row per class), RESULTS.md and the README block between its
``guided:`` markers.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from benchmarks.quality.records import records_at
from benchmarks.quality.report_text import pipeline_wall_lines, update_readme, with_notes
from benchmarks.quality.runs import pipeline_durations, report_command, run_pipelines
from pd_core import jobs
from pd_core.config import load_config
from pd_core.evaluation import classifier_key, floor_key, grid_key, write_grid
from pd_core.metrics import quality_long
from pd_core.store import CheckpointStore

OUT = Path(__file__).resolve().parent
REPO = OUT.parents[1]
COLUMNS = ["preset", "sampler", "steps", "w", "metric", "value", "n_samples", "seconds_per_image"]
SAMPLERS = ("teacher_ddim", "distilled", "distilled_stochastic")
HEADLINE = ("teacher_ddim", "distilled")
README_START, README_END = "<!-- guided:start -->", "<!-- guided:end -->"
STUDENT_STEPS = (8, 4, 2, 1)
WITHIN = 1.2  # target: the 4-step student's FD within 1.2x of the guided teacher's at its start steps


def pipeline_command(*, preset: str, work: Path, overrides: Sequence[str] = (),
                     teacher_uri: str | None = None) -> list[str]:
    """The ``pd run`` command line, with the work folder made absolute; ``overrides`` become ``--set`` options
    (settings outside the training hash only, such as runtime.threads, or the run is another pipeline);
    ``teacher_uri``: import that class-conditional teacher instead of training one."""
    work = work.resolve()
    sets = [arg for o in overrides for arg in ("--set", o)]
    imported = ["--teacher-uri", teacher_uri] if teacher_uri else []
    return ["pd", "run", "--preset", preset, *sets, *imported, "--storage", str(work / "store"), "--tracking-uri",
            f"sqlite:///{work / 'mlflow.db'}"]


def checkpoint_keys(cfg, *, pipeline: str) -> dict[str, str]:
    """``teacher``, ``guided`` (stage 1) and each round's student (``rounds/NN-SSSS``) -> store key."""
    keys = {"teacher": jobs.teacher_key(pipeline), "guided": jobs.guided_key(pipeline)}
    for i, (_, s) in enumerate(cfg.distill.rounds(), start=1):
        key = jobs.round_key(pipeline, round_index=i, student_steps=s)
        keys[key.split("/", 2)[2]] = key
    return keys


def records_of(store: CheckpointStore, cfg, *, pipeline: str) -> list[dict]:
    """Every evaluation record of a finished pipeline's checkpoints, stage 1 included (sha256-keyed caches)."""
    return records_at(store, checkpoint_keys(cfg, pipeline=pipeline).values())


def student_keys(cfg, *, pipeline: str) -> dict[int, str]:
    """Step count -> the student sampling in it: stage 1 at distill.start_steps, then each round's."""
    keys = checkpoint_keys(cfg, pipeline=pipeline)
    return {cfg.distill.start_steps: keys["guided"],
            **{s: keys[f"rounds/{i:02d}-{s:04d}"] for i, (_, s) in enumerate(cfg.distill.rounds(), start=1)}}


def measure_stochastic(cfg, store: CheckpointStore, *, pipeline: str) -> None:
    """The students of 8, 4 and 2 steps with the two-step stochastic sampler at every w (1 step is DDIM's);
    records cached in the store, so a rerun measures nothing."""
    from pd_core.evaluation import evaluate_checkpoint, feature_context

    ctx = feature_context(cfg, store)
    for steps, key in student_keys(cfg, pipeline=pipeline).items():
        if steps in STUDENT_STEPS and steps > 1:
            for w in cfg.eval.guidance_weights:
                evaluate_checkpoint(cfg, store, ctx, key=key, label="distilled_stochastic",
                                    sampler="stochastic_two_step", steps=steps, w=w)


def results_frame(*, preset: str, records: Sequence[Mapping], weights: Sequence[float]) -> pd.DataFrame:
    """Long results of the DDIM records at the evaluated weights (floors go to results.json)."""
    rows = [r for r in records if r["sampler"] in SAMPLERS and r.get("gamma") is None and r.get("w") in weights]
    if not rows:
        raise ValueError("no evaluation records: did the pipeline run with eval.enabled=true?")
    long = quality_long(rows)
    long.insert(0, "preset", preset)
    long["steps"] = long["steps"].astype("int64")
    long["w"] = long["w"].astype("float64")
    order = {s: i for i, s in enumerate(SAMPLERS)}
    long = long.sort_values(["sampler", "w", "steps", "metric"],
                            key=lambda c: c.map(order) if c.name == "sampler" else c)
    return long[COLUMNS].reset_index(drop=True)


def fd_metric(df: pd.DataFrame) -> str:
    """The headline metric: ``fid`` where present, else the offline ``fd_*`` (FD in our classifier's features)."""
    names = list(dict.fromkeys(df["metric"]))
    return next((m for m in names if m == "fid"), None) or next(m for m in names if m.startswith("fd"))


def value(df: pd.DataFrame, *, sampler: str, steps: int, w: float, metric: str) -> float:
    """One number of the results, NaN when it was not measured."""
    hit = df[(df.sampler == sampler) & (df.steps == steps) & (df.w == w) & (df.metric == metric)]
    return float(hit.value.iloc[0]) if len(hit) else math.nan


def target_checks(df: pd.DataFrame, *, metric: str, start_steps: int, weights: Sequence[float]) -> list[dict]:
    """The issue's targets at every w (lower metric is better): the 4-step student within 1.2x of the guided
    teacher at its start steps; the student beats the guided teacher's DDIM at the same N for N <= 8."""
    checks = []
    for w in weights:
        d4, t0 = (value(df, sampler=s, steps=n, w=w, metric=metric)
                  for s, n in (("distilled", 4), ("teacher_ddim", start_steps)))
        if not (math.isnan(d4) or math.isnan(t0)):
            checks.append({"target": f"4-step student within {WITHIN}x of the guided teacher at {start_steps} steps",
                           "w": w, "distilled": d4, "teacher_ddim": t0, "ratio": d4 / t0,
                           "met": bool(d4 <= WITHIN * t0)})
        for n in STUDENT_STEPS:
            d, t = (value(df, sampler=s, steps=n, w=w, metric=metric) for s in ("distilled", "teacher_ddim"))
            if not (math.isnan(d) or math.isnan(t)):
                checks.append({"target": f"student beats the guided teacher's DDIM at N={n}", "w": w,
                               "distilled": d, "teacher_ddim": t, "ratio": d / t, "met": bool(d < t)})
    return checks


def _steps_label(sampler: str, steps: int, *, start_steps: int) -> str:
    if sampler == "teacher_ddim":
        return f"guided teacher, {steps} steps ({2 * steps} calls)"
    return f"stage-1 student, {steps} steps" if steps == start_steps else f"student, {steps} step{'s' * (steps > 1)}"


def plot_tradeoff(df: pd.DataFrame, *, metric: str, start_steps: int, floor: float | None, path: Path,
                  title: str) -> None:
    """FD (y, log) against sample accuracy (x), one curve across w per (sampler, steps), each point labelled w."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.0), dpi=120)
    curves = [("teacher_ddim", start_steps, dict(color="black", marker="s", linewidth=2.2)),
              ("teacher_ddim", 4, dict(color="grey", marker="s", linestyle="--", alpha=0.7)),
              ("distilled", start_steps, dict(color="tab:purple", marker="D", alpha=0.8))]
    colours = {8: "tab:blue", 4: "tab:green", 2: "tab:orange", 1: "tab:red"}
    curves += [("distilled", n, dict(color=colours[n], marker="o")) for n in STUDENT_STEPS if n != start_steps]
    for sampler, steps, style in curves:
        fd = df[(df.sampler == sampler) & (df.steps == steps) & (df.metric == metric)].set_index("w").value
        acc = df[(df.sampler == sampler) & (df.steps == steps) & (df.metric == "sample_accuracy")].set_index("w").value
        both = pd.concat([acc.rename("acc"), fd.rename("fd")], axis=1).dropna().sort_index()
        if both.empty:
            continue
        ax.plot(both.acc, both.fd, label=_steps_label(sampler, steps, start_steps=start_steps), **style)
        if sampler == "teacher_ddim" and steps == start_steps or sampler == "distilled" and steps == 4:
            for w, row in both.iterrows():
                ax.annotate(f"w={w:g}", (row.acc, row.fd), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=style["color"])
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle=":", label="real vs real (floor)")
    ax.set_yscale("log")
    ax.set_xlabel("sample accuracy (our classifier on the samples vs the requested class)")
    ax.set_ylabel(metric + ("" if metric == "fid" else " (FD, classifier features)"))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_grids(panels: Sequence[tuple[str, bytes]], *, path: Path, title: str) -> None:
    """Grid PNGs from the store side by side (each one row per class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.9), dpi=100, layout="constrained")
    for ax, (label, png) in zip(axes, panels, strict=True):
        ax.axis("off")
        ax.imshow(Image.open(io.BytesIO(png)).convert("L"), cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    Image.open(buf).convert("L").save(path, optimize=True)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def headline_markdown(df: pd.DataFrame, *, metric: str, start_steps: int, weights: Sequence[float]) -> str:
    """Rows: step counts; per w, the guided teacher's and the student's FD (accuracy in brackets); bold where the
    student beats the teacher's DDIM at the same number of steps."""
    header = "| steps | " + " | ".join(f"teacher w={w:g} | student w={w:g}" for w in weights) + " |"
    samplers = HEADLINE
    lines = [header, "|---:|" + "---:|---:|" * len(weights)]
    for n in sorted({int(s) for s in df.steps}, reverse=True):
        cells = []
        for w in weights:
            t, d = (value(df, sampler=s, steps=n, w=w, metric=metric) for s in samplers)
            ta, da = (value(df, sampler=s, steps=n, w=w, metric="sample_accuracy") for s in samplers)
            tc = f"{_fmt(t)} ({_fmt(ta, 2)})" if not math.isnan(t) else ""
            dc = f"{_fmt(d)} ({_fmt(da, 2)})" if not math.isnan(d) else ""
            if dc and not math.isnan(t) and n != start_steps and d < t:
                dc = f"**{dc}**"
            cells += [tc, dc]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stochastic_markdown(df: pd.DataFrame, *, metric: str, weights: Sequence[float]) -> str:
    """The students with DDIM and with the two-step stochastic sampler (same N network calls), per w."""
    lines = ["| steps | " + " | ".join(f"DDIM w={w:g} | stochastic w={w:g}" for w in weights) + " |",
             "|---:|" + "---:|---:|" * len(weights)]
    for n in (s for s in STUDENT_STEPS if s > 1):
        cells = []
        for w in weights:
            for sampler in ("distilled", "distilled_stochastic"):
                fd = value(df, sampler=sampler, steps=n, w=w, metric=metric)
                acc = value(df, sampler=sampler, steps=n, w=w, metric="sample_accuracy")
                cells.append(f"{_fmt(fd)} ({_fmt(acc, 2)})" if not math.isnan(fd) else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)




def build_report(*, preset: str, work: Path, out: Path, readme: Path | None, grid_w: float | None = None,
                 overrides: Sequence[str] = (), teacher_uri: str | None = None) -> dict:
    from benchmarks.speed.common import machine

    work = work.resolve()
    store = CheckpointStore(str(work / "store"))
    cfg = load_config(preset=preset, overrides=list(overrides))
    weights = list(cfg.eval.guidance_weights)
    start = cfg.distill.start_steps
    measure_stochastic(cfg, store, pipeline=preset)
    df = results_frame(preset=preset, records=records_of(store, cfg, pipeline=preset), weights=weights)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    metric = fd_metric(df)
    n_samples = int(df["n_samples"].max())
    classifier = store.read_manifest(classifier_key(cfg))
    if classifier is None:
        raise SystemExit(f"error: no feature classifier at {store.uri(classifier_key(cfg))}; run the pipeline first")
    floor_at = floor_key(cfg, extractor_id=classifier["sha256"])
    floors = [json.loads(store.get_bytes(floor_at))] if store.exists(floor_at) else []
    floor = floors[0][metric] if floors else None
    checks = target_checks(df, metric=metric, start_steps=start, weights=weights)
    plot_tradeoff(df, metric=metric, start_steps=start, floor=floor, path=out / "fd_vs_accuracy.png",
                  title=f"{preset}: {n_samples} class-balanced samples per point, across w; lower and right is better")

    grid_w = grid_w if grid_w is not None else min(weights, key=lambda w: abs(w - 1.0))
    keys = checkpoint_keys(cfg, pipeline=preset)
    students = student_keys(cfg, pipeline=preset)
    panels = []
    for label, key, n in [(f"guided teacher, {start} steps ({2 * start} calls)", keys["teacher"], start),
                          ("guided teacher, 4 steps (8 calls)", keys["teacher"], 4),
                          ("student, 4 steps (4 calls)", students[4], 4), ("student, 1 step", students[1], 1)]:
        write_grid(cfg, store, key=key, sampler="ddim", steps=n, w=grid_w)  # cached: made here only if missing
        panels.append((label, store.get_bytes(grid_key(key, sampler="ddim", steps=n, w=grid_w))))
    plot_grids(panels, path=out / "samples.png",
               title=f"{preset}, w = {grid_w:g}: row k asks for class k; the same noise in every panel")

    train = {name: store.read_manifest(key).get("train_seconds") for name, key in keys.items()}
    durations = pipeline_durations(f"sqlite:///{work / 'mlflow.db'}", pipelines=(preset,))
    command = shlex.join(pipeline_command(preset=preset, work=work, overrides=overrides, teacher_uri=teacher_uri))
    shown = command.replace(str(REPO), "$PWD").replace("'", '"')
    report_cmd = report_command(preset=preset, work=work, teacher_uri=teacher_uri, overrides=overrides,
                                module="benchmarks.guided.reproduce", default_work=REPO / "runs" / "guided")
    summary = {"preset": preset, "machine": machine(), "command": shown,
               "report_command": report_cmd, "metric": metric,
               "n_samples": n_samples, "start_steps": start, "weights": weights, "grid_w": grid_w,
               "w_range": [cfg.guidance.w_min, cfg.guidance.w_max], "label_dropout": cfg.teacher.label_dropout,
               "classifier_test_accuracy": classifier.get("test_accuracy"), "floor": floors, "floor_value": floor,
               "eval_seed": cfg.eval.seed, "pipeline_seed": cfg.pipeline.seed, "targets": checks,
               "train_seconds": train, "pipeline_wall_seconds": durations}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    table = headline_markdown(df, metric=metric, start_steps=start, weights=weights)
    results_md = out / "RESULTS.md"
    old = results_md.read_text() if results_md.exists() else ""
    results_md.write_text(with_notes(results_markdown(summary, table=table, cfg=cfg, df=df), old=old))
    if readme is not None:
        update_readme(readme, readme_block(summary, table=table), start=README_START, end=README_END)
    return summary


def _targets_met(summary: Mapping) -> str:
    met = sum(c["met"] for c in summary["targets"])
    return f"{met} of {len(summary['targets'])}"


def readme_block(summary: Mapping, *, table: str) -> str:
    return (f"Fashion-MNIST, preset `{summary['preset']}`, on this 2-core CPU machine (`{summary['report_command']}`; "
            f"commands, timings and notes in [benchmarks/guided/RESULTS.md](benchmarks/guided/RESULTS.md)). "
            f"`{summary['metric']}` (FD in our classifier's feature space, not Inception FID; lower is better) with "
            f"the sample accuracy in brackets, {summary['n_samples']} class-balanced samples per cell. The guided "
            f"teacher makes 2 network calls per step, the student 1. Bold: the student beats the guided teacher's "
            f"DDIM at the same number of steps. Targets met: {_targets_met(summary)}.\n\n{table}\n\n"
            f"![FD vs sample accuracy](benchmarks/guided/fd_vs_accuracy.png)")


def results_markdown(summary: Mapping, *, table: str, cfg, df: pd.DataFrame) -> str:
    """RESULTS.md: machine, command, sample counts, seeds, wall times, the table, the targets, the figures."""
    preset, metric, start = summary["preset"], summary["metric"], summary["start_steps"]
    lines = [f"# Guided distillation: `{preset}` (Meng et al., CVPR 2023, at our scale)", "",
             "Produced by one command (from the repo root, venv active):", "", f"    {summary['report_command']}", "",
             "which runs this pipeline (idempotent: a rerun trains and measures nothing) and then writes this file, "
             "`results.csv`, `results.json`, `fd_vs_accuracy.png` and `samples.png`:", "",
             f"    {summary['command']}", "",
             f"- **Machine:** {re.sub(r' [(][0-9]+ threads[)]', '', summary['machine'])}; no GPU; the pipeline ran "
             f"with runtime.threads = {cfg.runtime.threads or 'torch default (one per core)'}.",
             f"- **Metric:** `{metric}` = "
             + ("Inception FID" if metric == "fid" else "FD in our classifier's feature space (not Inception FID)")
             + " and `sample_accuracy`, the fraction of samples the same classifier "
             f"({summary['classifier_test_accuracy']:.2%} test accuracy) puts in the class they asked for; also "
             "`kid_*`, precision and recall in results.csv. "
             f"{summary['n_samples']} samples per measurement, class-balanced (sample i asks for class i mod 10), "
             f"against the 10k test split; the same noise and labels for every sampler (eval seed "
             f"{summary['eval_seed']}); pipeline seed {summary['pipeline_seed']}.",
             "- **Floor:** real vs real at the same N: "
             + ", ".join(f"{k} {v:.4g}" for f in summary["floor"] for k, v in f.items()
                         if isinstance(v, float) and k != "seconds_per_image") + ".",
             f"- **Teacher:** class-conditional U-Net, {cfg.teacher.updates} updates x {cfg.teacher.batch_size} "
             f"images, label dropout {summary['label_dropout']:g}; guided DDIM x_w = (1 + w) x(z, c) - w x(z, null), "
             "two network calls per step (one at w = 0).",
             f"- **Stage 1:** {cfg.guidance.updates} updates x {cfg.guidance.batch_size}, w ~ U{summary['w_range']}; "
             f"lr {cfg.guidance.lr:g} (x{cfg.guidance.embedding_lr_scale:g} for the new guidance embedding, whose last "
             f"layer starts at zero), grad clip {cfg.guidance.grad_clip}; its student samples in {start} steps, 1 call "
             "each; it "
             f"is the `distilled` row at {start} steps.",
             f"- **Stage 2:** rounds {start} -> {cfg.distill.final_steps}, {cfg.distill.updates_per_round} updates "
             + (f"each ({cfg.distill.last_rounds_updates} for the 2- and 1-step rounds)"
                if cfg.distill.last_rounds_updates else "each")
             + f" x {cfg.distill.batch_size}, w ~ U{summary['w_range']} and the label as inputs.", "",
             "## Headline", "", table, "",
             f"`{metric}` (sample accuracy in brackets) at each guidance weight w. Bold: the student beats the "
             f"guided teacher's DDIM at the same number of steps (with half the network calls per step).", "",
             "![FD vs sample accuracy](fd_vs_accuracy.png)", "", "![samples](samples.png)", "",
             "## The students' stochastic sampler", "",
             stochastic_markdown(df, metric=metric, weights=summary["weights"]), "",
             f"`{metric}` (sample accuracy) of the students with DDIM and with the N-step stochastic sampler of Meng "
             "et al. (a DDIM step of 2/N, then a forward-process step back to t - 1/N; the last step returns x_hat): "
             "N network calls either way.", "",
             "## Targets", "", "| target | w | student | guided teacher | ratio | met |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {c['target']} | {c['w']:g} | {c['distilled']:.3g} | {c['teacher_ddim']:.3g} | {c['ratio']:.2f} | "
              f"{'yes' if c['met'] else '**no**'} |" for c in summary["targets"]]
    lines += ["", f"Targets met: {_targets_met(summary)}.", "",
              f"## Seconds per image (sampling, this CPU, batch of {cfg.eval.batch_size})", "",
              "| steps | " + " | ".join(f"{s} w={w:g}" for s in HEADLINE for w in summary["weights"]) + " |",
              "|---:|" + "---:|" * (len(HEADLINE) * len(summary["weights"]))]
    spi = df.drop_duplicates(["sampler", "steps", "w"])
    for n in sorted({int(s) for s in df.steps}, reverse=True):
        cells = []
        for s in HEADLINE:
            for w in summary["weights"]:
                hit = spi[(spi.sampler == s) & (spi.steps == n) & (spi.w == w)]
                cells.append(_fmt(float(hit.seconds_per_image.iloc[0])) if len(hit) else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Wall times", "", "| stage | training seconds |", "|---|---:|"]
    lines += [f"| {stage} | {f'{sec:.0f}' if sec is not None else 'imported'} |"
              for stage, sec in summary["train_seconds"].items()]
    lines.append("")
    lines += pipeline_wall_lines(summary["pipeline_wall_seconds"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fmnist-guided-cpu")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "guided", help="store, MLflow db and logs")
    p.add_argument("--out", type=Path, default=OUT, help="where the results files go")
    p.add_argument("--report-only", action="store_true", help="do not run the pipeline; rebuild from the store")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    p.add_argument("--grid-w", type=float, help="guidance weight of samples.png (default: the evaluated w nearest 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to pd run (e.g. runtime.threads=1 on a crowded machine) and recorded")
    p.add_argument("--teacher-uri", help="import this class-conditional teacher instead of training one")
    args = p.parse_args(argv)
    if not args.report_only:
        run_pipelines({"distilled": pipeline_command(preset=args.preset, work=args.work, overrides=args.overrides,
                                                     teacher_uri=args.teacher_uri)},
                      log_dir=args.work.resolve() / "logs")
    summary = build_report(preset=args.preset, work=args.work, out=args.out, overrides=args.overrides,
                           teacher_uri=args.teacher_uri,
                           readme=None if args.no_readme else REPO / "README.md", grid_w=args.grid_w)
    for c in summary["targets"]:
        print(f"{'met ' if c['met'] else 'MISS'}  w={c['w']:g} {c['target']}: "
              f"{c['distilled']:.4g} vs {c['teacher_ddim']:.4g}")
    print(f"wrote {args.out}/results.csv, results.json, RESULTS.md, fd_vs_accuracy.png, samples.png")


if __name__ == "__main__":
    main()
