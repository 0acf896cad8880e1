"""The prepared GPU run: speed figures, then the fmnist-gpu pipeline, each part bounded in time; results to --out.

    bash benchmarks/gpu/run.sh OUT                  # one GPU, about 9 minutes: the command of benchmarks/gpu/README.md
    python -m benchmarks.gpu.run --out OUT          # the same without the wrapper's outer timeout and log file
    python -m benchmarks.gpu.run --out OUT --tiny   # CPU, smoke-sized model and data: every part and file (CI)

Parts, in order, each with its own budget and all within --total-s:
1. speed: ``benchmarks.speed.gpu_bench.measure`` on the paper's CIFAR-10 U-Net at batch 128 (fp32 / bf16 /
   bf16+compile updates, MFU against the bf16 matmul peak measured in the same run, the distillation /
   teacher update ratio, 1- and 4-step sampling) within --speed-s;
2. quality: the ``fmnist-gpu`` preset. The update and forward rates are measured first and the update
   counts fitted to --quality-s (``benchmarks.gpu.fit``); then ``benchmarks.gpu.quality`` runs the
   teacher, every round and the evaluation (the pipeline's N, plus --large-n at the end points, each
   with the real-vs-real floor at the same N), stopped once --quality-s plus a grace is spent.

Writes to --out, flat and at most 8 files (what the device machine returns): speed.csv and quality.csv
(rows of benchmarks/speed/results.csv and benchmarks/quality/results.csv), results.json (machine,
command, parts, rates, fit, timings, targets), quality_vs_steps.png, samples.png and
teacher_<N>_steps.png; run.sh adds run.log. results.json is rewritten after each part, so a killed
run keeps what finished. Checkpoints and evaluation caches go to --work (default: a new temporary
folder), never to --out. ``python -m benchmarks.gpu.merge OUT`` copies a finished run into the repository.
Exit status: 0 when every part finished, 1 when one failed or ran out of time, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from benchmarks.gpu import quality
from benchmarks.gpu.fit import fit_schedule, measure_costs
from benchmarks.gpu.report import fd_metric, target_checks, value_at
from benchmarks.quality.plots import plot_grids, plot_quality
from benchmarks.speed.common import COLUMNS as SPEED_COLUMNS
from benchmarks.speed.common import machine
from benchmarks.speed.gpu_bench import Budget, dry_run_plan, gpu_plan, measure
from pd_core.config import Config, ConfigError, load_config
from pd_core.evaluation import grid_key
from pd_core.store import CheckpointStore

log = logging.getLogger("benchmarks.gpu")

REPO = Path(__file__).resolve().parents[2]
PRESET, CPU_PRESET = "fmnist-gpu", "fmnist-cpu"
DEFAULT_DATA = REPO / "benchmarks" / "gpu" / "data" / "fashion-mnist"  # the carried copy (benchmarks/gpu/README.md)
GRACE_S = 30.0  # the quality part stops at --quality-s plus this (the fit aims at --quality-s)
OVERHEAD_S = 25.0  # start-up, data, feature classifier, checkpoints: the fit's fixed cost (estimate)
SMALL = {"gpu": {"speed_s": 180.0, "quality_s": 330.0, "total_s": 560.0, "large_n": 5000},
         "tiny": {"speed_s": 60.0, "quality_s": 150.0, "total_s": 240.0, "large_n": 128}}
# --tiny: the same code on a smoke-sized network and schedule, on the CPU (seconds per part)
TINY_OVERRIDES = (
    "model.ch=16", "model.emb_ch=64", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
    "model.head_dim=null", "model.norm_groups=8", "model.dropout=0.0",
    "data.image_size=14", "data.limit=512",
    "teacher.updates=30", "teacher.batch_size=32", "teacher.warmup_steps=5", "teacher.ema_decay=0.9",
    "teacher.log_every=10", "teacher.checkpoint_every=20",
    "distill.start_steps=8", "distill.updates_per_round=6", "distill.last_rounds_updates=null",
    "distill.batch_size=32", "distill.log_every=3", "distill.checkpoint_every=3",
    "eval.num_samples=64", "eval.batch_size=64", "eval.kid_subsets=5", "eval.kid_subset_size=32",
    "eval.classifier_epochs=1", "eval.stochastic_gammas=[0.0,1.0]", "eval.grid_size=4",
    "runtime.device=cpu", "runtime.precision=fp32", "runtime.channels_last=false", "runtime.threads=1",
    "pipeline.name=fmnist-gpu-tiny")
OUT_FILES = ("speed.csv", "quality.csv", "results.json", "quality_vs_steps.png", "samples.png")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m benchmarks.gpu.run", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the results (created; files are replaced)")
    p.add_argument("--tiny", action="store_true", help="CPU, smoke-sized model and data: checks every part")
    p.add_argument("--work", type=Path, help="store for checkpoints and caches (default: a new temporary folder); "
                                             "a rerun over the same store resumes")
    p.add_argument("--data", type=Path, help=f"Fashion-MNIST IDX folder (default: {DEFAULT_DATA.relative_to(REPO)} "
                                             "when it exists, else the preset's default location)")
    p.add_argument("--parts", default="speed,quality", help="comma-separated subset of speed,quality")
    p.add_argument("--speed-s", type=float, help="speed part budget in seconds (GPU 180, tiny 60)")
    p.add_argument("--quality-s", type=float, help="quality part budget in seconds (GPU 330, tiny 150)")
    p.add_argument("--total-s", type=float, help="no part runs past this many seconds from the start (GPU 560)")
    p.add_argument("--large-n", type=int, help="samples at the end points (GPU 5000, tiny 128)")
    p.add_argument("--no-fit", action="store_true", help="run the preset's update counts as written")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the fmnist-gpu preset (repeatable)")
    args = p.parse_args(argv)
    defaults = SMALL["tiny" if args.tiny else "gpu"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or set(parts) - {"speed", "quality"}:
        p.error(f"--parts must name speed and/or quality, got {args.parts!r}")
    args.parts = parts
    for name in ("speed_s", "quality_s", "total_s"):
        if not 1 <= getattr(args, name) <= 3600:
            p.error(f"--{name.replace('_', '-')} must be between 1 and 3600 seconds, got {getattr(args, name):g}")
    if not 2 <= args.large_n <= 50000:
        p.error(f"--large-n must be between 2 and 50000 (the floor needs as many training images), got {args.large_n}")
    if args.data is not None and not args.data.is_dir():
        p.error(f"--data {args.data} is not a folder; give the folder holding the Fashion-MNIST *.gz files")
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device here; run with --tiny to check the script on a CPU")
    return args


def display_command(argv: list[str], *, out: Path) -> str:
    """The command as run, with the output folder shown as $OUT."""
    shown = ["$OUT" if a == str(out) else a for a in argv]
    return " ".join(["python -m benchmarks.gpu.run", *shown])


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def run_part(name: str, fn: Callable[[], None], *, summary: dict, out: Path) -> bool:
    """Run one part; record ok / timed_out / failed with its seconds and one-line error; True when ok."""
    t0 = time.perf_counter()
    summary["parts"][name] = {"status": "running", "seconds": 0.0, "error": None}
    write_json(out / "results.json", summary)
    status, error = "ok", None
    try:
        fn()
    except quality.PartTimeout as exc:
        status, error = "timed_out", str(exc)
    except Exception as exc:  # noqa: BLE001 - a failed part is recorded and the next part still runs
        status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.error("%s part failed:\n%s", name, traceback.format_exc())
    summary["parts"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "error": error}
    write_json(out / "results.json", summary)
    log.info("part %s: %s in %.0f s%s", name, status, summary["parts"][name]["seconds"],
             f" ({error})" if error else "")
    return status == "ok"


def speed_part(args: argparse.Namespace, *, summary: dict, out: Path, total: Budget) -> None:
    plan = dry_run_plan() if args.tiny else gpu_plan()
    device = "cpu (tiny)" if args.tiny else torch.cuda.get_device_name(torch.device("cuda"))
    rows = measure(plan, budget=Budget(min(args.speed_s, total.left())), echo=log.info)
    with (out / "speed.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SPEED_COLUMNS)
        writer.writeheader()
        for benchmark, value, unit in rows:
            writer.writerow({"benchmark": benchmark, "device": device, "value": f"{value:.4g}", "unit": unit,
                             "command": summary["command"]})
    summary["speed"] = {benchmark: value for benchmark, value, _ in rows}
    summary["speed_units"] = {benchmark: unit for benchmark, _, unit in rows}


def quality_overrides(args: argparse.Namespace) -> list[str]:
    """Tiny sizes (with --tiny), the data folder, then the user's --set overrides."""
    data = args.data if args.data is not None else (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    out = list(TINY_OVERRIDES) if args.tiny else []
    if data is not None:
        out.append(f"data.url={data.resolve()}")
    return out + list(args.overrides)


def large_overrides(n: int) -> list[str]:
    """The evaluation settings at the larger N (KID on subsets of up to 1000, as the paper's scale suggests)."""
    return [f"eval.num_samples={n}", "eval.kid_subsets=100", f"eval.kid_subset_size={min(1000, n)}"]


def quality_part(args: argparse.Namespace, *, summary: dict, out: Path, work: Path, total: Budget) -> None:
    t0 = time.perf_counter()
    overrides = quality_overrides(args)
    cfg = load_config(preset=PRESET, overrides=overrides)
    q = summary["quality"] = {
        "preset": cfg.pipeline.name, "n_samples": cfg.eval.num_samples,
        "cpu_preset_n_samples": load_config(preset=CPU_PRESET).eval.num_samples, "large_n": args.large_n,
        "start_steps": cfg.distill.start_steps, "overrides": overrides, "data": cfg.data.url or "preset default"}
    steps, blocks, warmup, iters = (1, 1, 1, 1) if args.tiny else (5, 2, 3, 5)
    large = load_config(preset=PRESET, overrides=overrides + large_overrides(args.large_n))
    costs = measure_costs(cfg, large, steps=steps, blocks=blocks, warmup=warmup, iters=iters)
    target = min(args.quality_s - (time.perf_counter() - t0), total.left() - GRACE_S)
    fit = fit_schedule(cfg, costs, budget_s=target, large_n=args.large_n, overhead_s=OVERHEAD_S)
    apply = not (args.tiny or args.no_fit) and fit.scale != 1.0
    q.update(costs=asdict(costs), fit=asdict(fit), fit_applied=apply)
    log.info("rates: teacher update %.1f ms, distillation update %.1f ms, %.0f network calls/s; fit scale %.2f "
             "(%s); predicted %s", costs.teacher_update_s * 1e3, costs.distill_update_s * 1e3, costs.forwards_per_s,
             fit.scale, "applied" if apply else "not applied", fit.predicted_s)
    if apply:
        overrides = overrides + fit.overrides()
        cfg = load_config(preset=PRESET, overrides=overrides)
        large = load_config(preset=PRESET, overrides=overrides + large_overrides(args.large_n))
        q["overrides"] = overrides
    q["schedule"] = {"teacher_updates": cfg.teacher.updates, "teacher_batch": cfg.teacher.batch_size,
                     "round_updates": {s: cfg.distill.updates_for(s) for _, s in cfg.distill.rounds()},
                     "distill_batch": cfg.distill.batch_size}
    store = CheckpointStore(str(work / "store"))
    hard = Budget(min(args.quality_s + GRACE_S - (time.perf_counter() - t0), total.left()))
    run = quality.QualityRun()
    try:
        quality.run_pipeline(cfg, large, store, budget=hard, run=run)
    finally:
        write_quality_outputs(cfg, store, run, out=out, summary=summary)


def write_quality_outputs(cfg: Config, store: CheckpointStore, run: quality.QualityRun, *, out: Path,
                          summary: dict) -> None:
    """quality.csv, the plot and the grids from what the part finished; the part's facts into the summary."""
    q = summary["quality"]
    df = quality.results_frame(run, preset=q["preset"])
    df.to_csv(out / "quality.csv", index=False)
    metric, n = fd_metric(df), cfg.eval.num_samples
    gammas = df[(df["sampler"] == "teacher_stochastic") & (df["metric"] == "gamma") & (df["n_samples"] == n)]
    q.update(metric=metric, best_gamma={int(r.steps): float(r.value) for r in gammas.itertuples()},
             seconds=run.seconds, classifier=run.classifier,
             checkpoints={int(s): {"sha256": i.sha256, "train_seconds": round(i.train_seconds, 1)}
                          for s, i in sorted(run.chain.items(), reverse=True)})
    main = df[(df["n_samples"] == n) & (df["sampler"] != quality.FLOOR)]
    if metric is not None and not main.empty:
        plot_quality(main, metric=metric, floor=value_at(df, sampler=quality.FLOOR, metric=metric, n_samples=n),
                     path=out / "quality_vs_steps.png", title=f"{q['preset']}: {n} samples, lower is better")
    grids = {}
    for steps, info in run.chain.items():
        kind = "teacher_ddim" if info.round == 0 else "distilled"
        for at in (quality.GRID_STEPS if info.round == 0 else (steps,)):
            if store.exists(grid_key(info.key, sampler="ddim", steps=at)):
                grids[(kind, at)] = store.get_bytes(grid_key(info.key, sampler="ddim", steps=at))
    if grids:
        plot_grids(grids, steps=quality.GRID_STEPS, path=out / "samples.png",
                   title=f"{q['preset']}: the same noise for every panel (eval seed {cfg.eval.seed})")
    teacher = run.chain.get(cfg.distill.start_steps)
    if teacher is not None and store.exists(grid_key(teacher.key, sampler="ddim", steps=cfg.distill.start_steps)):
        (out / f"teacher_{cfg.distill.start_steps}_steps.png").write_bytes(
            store.get_bytes(grid_key(teacher.key, sampler="ddim", steps=cfg.distill.start_steps)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:  # a bad --set fails here, before anything is written
        load_config(preset=PRESET, overrides=quality_overrides(args))
    except ConfigError as exc:
        print(f"python -m benchmarks.gpu.run: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.tiny:
        torch.set_num_threads(1)  # a smoke-sized net gains nothing from a 2nd thread on a shared machine
    total = Budget(args.total_s)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # a rerun into the same folder never mixes in an earlier run's files
        (out / name).unlink(missing_ok=True)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="pd-gpu-run-"))
    device = "cpu (tiny)" if args.tiny else torch.cuda.get_device_name(torch.device("cuda"))
    summary: dict = {"tiny": args.tiny, "command": display_command(argv, out=args.out), "device": device,
                     "machine": machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "work": str(work),
                     "budgets_s": {k: getattr(args, k) for k in ("speed_s", "quality_s", "total_s")}, "parts": {}}
    log.info("GPU run on %s: parts %s, budgets %s, results to %s, store in %s", device, ",".join(args.parts),
             summary["budgets_s"], out, work)
    ok = True
    if "speed" in args.parts:
        ok &= run_part("speed", lambda: speed_part(args, summary=summary, out=out, total=total), summary=summary,
                       out=out)
    if "quality" in args.parts:
        ok &= run_part("quality", lambda: quality_part(args, summary=summary, out=out, work=work, total=total),
                       summary=summary, out=out)
    summary["targets"] = checks = targets_of(summary, out=out)
    summary["seconds"] = round(total.elapsed(), 1)
    write_json(out / "results.json", summary)
    for c in checks:
        verdict = "n/a " if c["met"] is None else ("met " if c["met"] else "MISS")
        log.info("%s %s: %s vs %s", verdict, c["target"], c["value"], c["reference"])
    log.info("done in %.0f s; wrote %s", total.elapsed(), ", ".join(sorted(p.name for p in out.iterdir())))
    return 0 if ok else 1


def targets_of(summary: dict, *, out: Path) -> list[dict]:
    """The issue's targets from what the run wrote (quality.csv) and measured (speed)."""
    q = summary.get("quality") or {}
    path = out / "quality.csv"
    df = pd.read_csv(path).astype({"steps": "Int64", "n_samples": "Int64"}) if path.exists() else \
        pd.DataFrame(columns=quality.COLUMNS)
    return target_checks(df, summary.get("speed") or {}, start_steps=q.get("start_steps", 0),
                         n_samples=q.get("n_samples", 0), large_n=q.get("large_n"))


if __name__ == "__main__":
    raise SystemExit(main())
