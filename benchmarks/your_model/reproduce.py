"""Distill a teacher nobody here trained: a diffusers UNet2DModel trained on Fashion-MNIST with diffusers' recipe.

    python -m benchmarks.your_model.reproduce [--work runs/your_model] [--report-only]

1. ``benchmarks/your_model/train_teacher.py`` (when ``<work>/teacher`` holds no model yet): diffusers'
   own training recipe, saved with ``save_pretrained``.
2. ``pd run --preset fmnist-cpu --config benchmarks/your_model/config.yaml --name fmnist-diffusers
   --teacher-uri diffusers:<work>/teacher``: import, teacher baselines (our DDIM), rounds 16 -> 1 with the
   default student parameterization, evaluation, MLflow, report.
3. The parameterization study: the same teacher distilled 4 -> 2 -> 1 with eps, x and v students
   (pipelines ``param-eps``, ``param-x``, ``param-v``; 80 updates per round; eps with weighting ``snr``,
   its own MSE, since eps with truncated SNR diverges; x and v with ``snr_trunc``).
4. ``diffusers_ddim``: the teacher sampled as ``DDIMPipeline.from_pretrained(teacher)`` does with its
   defaults (``baselines.py``), our teacher DDIM with another noise seed, for the sampling noise of one
   number, and each student sampled unclipped and with eps re-derived from the clipped x (the
   clipped-vs-unclipped measurement).
5. ``results.csv`` (long: preset, sampler, steps, metric, value, n_samples, seconds_per_image; floor rows
   with sampler ``real_data_floor``), ``results.json`` (wall times, commands, machine) and the generated
   top of RESULTS.md (its "## Notes" section is written by people and kept).

Every step is idempotent: a rerun trains and measures nothing that is already in ``<work>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.your_model.baselines import clip_study_records, diffusers_ddim_records, seed_spread_records
from pd_core import evaluation, jobs
from pd_core.config import load_config
from pd_core.metrics import quality_long
from pd_core.store import CheckpointStore

OUT = Path(__file__).resolve().parent
CONFIG = OUT / "config.yaml"
MAIN = "fmnist-diffusers"
STUDY = {"eps": ["--set", "diffusion.weighting=snr"], "x": [], "v": []}
STUDY_SETTINGS = ["--set", "distill.start_steps=4", "--set", "distill.updates_per_round=80"]
COLUMNS = ["preset", "sampler", "steps", "metric", "value", "n_samples", "seconds_per_image"]
NOTES = "## Notes"


def commands(work: Path, *, extra: list[str]) -> dict[str, list[str]]:
    """The ``pd run`` command lines: the main pipeline and the three study pipelines (``extra`` overrides last)."""
    common = ["--preset", "fmnist-cpu", "--config", str(CONFIG), "--teacher-uri", f"diffusers:{work / 'teacher'}",
              "--storage", str(work / "store"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    sets = [a for o in extra for a in ("--set", o)]
    out = {MAIN: ["pd", "run", "--name", MAIN, *common, *sets]}
    for kind, study in STUDY.items():
        out[f"param-{kind}"] = ["pd", "run", "--name", f"param-{kind}", *common, *STUDY_SETTINGS,
                                "--set", f"distill.student_parameterization={kind}", *study, *sets]
    return out


def _run(cmd: list[str], *, log: Path) -> float:
    """Run one command with its output teed to ``log``; its wall seconds (SystemExit on failure)."""
    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    exe = [str(Path(sys.executable).with_name(cmd[0]))] if cmd[0] == "pd" else [sys.executable, "-m"]
    print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}  (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen([*exe, *cmd[1:]] if cmd[0] == "pd" else [*exe, *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            sys.stdout.write(line)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    print(f"[{time.strftime('%H:%M:%S')}] exit {rc} after {seconds:.0f} s", flush=True)
    if rc != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} exited {rc}; see {log} (a rerun resumes where it stopped)")
    return seconds


def run_all(work: Path, *, extra: list[str], teacher_args: list[str], only: list[str] | None = None
            ) -> dict[str, float]:
    """Steps 1-3; wall seconds per stage (this invocation's)."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    if not (work / "teacher" / "model_index.json").is_file():
        walls["train_teacher"] = _run(["benchmarks.your_model.train_teacher", "--out", str(work / "teacher"),
                                       *teacher_args], log=logs / "train_teacher.log")
    for name, cmd in commands(work, extra=extra).items():
        if only is None or name in only:
            walls[name] = _run(cmd, log=logs / f"{name}.log")
    return walls


def _cfg(work: Path, name: str, *overrides: str):
    return load_config(preset="fmnist-cpu", path=str(CONFIG),
                       overrides=[f"pipeline.name={name}", f"storage.root={work / 'store'}",
                                  f"pipeline.teacher_uri=diffusers:{work / 'teacher'}", *overrides])


def _records(store: CheckpointStore, cfg, *, pipeline: str) -> list[dict]:
    """Every cached evaluation record of a pipeline's checkpoints, plus its floor."""
    keys = [jobs.teacher_key(pipeline)] + [jobs.round_key(pipeline, round_index=i, student_steps=s)
                                           for i, (_, s) in enumerate(cfg.distill.rounds(), start=1)]
    out = []
    for key in keys:
        manifest = store.read_manifest(key)
        if manifest is None:
            raise SystemExit(f"error: {store.uri(key)} is not a complete checkpoint; run without --report-only")
        tail = f"-{evaluation.eval_hash(cfg)}.json"
        out += [json.loads(store.get_bytes(k)) for k in store.list(evaluation.records_prefix(manifest["sha256"]))
                if k.endswith(tail) and "/ddim-" in k and "noise-seed" not in k]
    if not out:
        raise SystemExit(f"error: no evaluation records of {pipeline} under this evaluation config (its hash "
                         f"changes with the eval settings and the code's eval fields); run without --report-only")
    return out


def collect(work: Path, *, extra: list[str]) -> tuple[pd.DataFrame, dict]:
    """The long results table and the extra facts (floor, classifier accuracy, baseline wall time)."""
    store = CheckpointStore(str(work / "store"))
    cfg = _cfg(work, MAIN, *extra)
    torch.set_num_threads(cfg.runtime.threads or 1)
    ctx = evaluation.feature_context(cfg, store)
    steps = [cfg.distill.start_steps] + [s for _, s in cfg.distill.rounds()]
    t0 = time.perf_counter()
    teacher_key = jobs.teacher_key(MAIN)
    theirs = diffusers_ddim_records(cfg, store, ctx, teacher_key=teacher_key, teacher_dir=work / "teacher",
                                    steps=steps)
    spread = seed_spread_records(cfg, store, ctx, teacher_key=teacher_key, steps=steps, seed=cfg.eval.seed + 1)
    students = {s: jobs.round_key(MAIN, round_index=i, student_steps=s)
                for i, (_, s) in enumerate(cfg.distill.rounds(), start=1)}
    clipping = clip_study_records(cfg, store, ctx, student_keys=students)
    baseline_seconds = time.perf_counter() - t0
    main = _records(store, cfg, pipeline=MAIN)
    floor = evaluation.floor_record(cfg, store, ctx)
    frames = [_long(MAIN, main + theirs + spread + clipping + [floor])]
    for kind, overrides in STUDY.items():
        study_cfg = _cfg(work, f"param-{kind}", f"distill.student_parameterization={kind}",
                         *[o for o in (overrides + STUDY_SETTINGS) if o != "--set"], *extra)
        rows = [r for r in _records(store, study_cfg, pipeline=f"param-{kind}") if r["sampler"] == "distilled"]
        frames.append(_long(f"param-{kind}", rows))
    df = pd.concat(frames, ignore_index=True)[COLUMNS]
    facts = {"fd_name": ctx.extractor.fd_name, "floor": floor, "baseline_seconds": round(baseline_seconds, 1),
             "classifier_accuracy": ctx.extractor.manifest.get("test_accuracy"), "n_samples": cfg.eval.num_samples}
    return df, facts


def _long(preset: str, records: list[dict]) -> pd.DataFrame:
    rows = [{**r, "sampler": "real_data_floor" if r["sampler"] == "floor" else r["sampler"]} for r in records]
    long = quality_long(rows)
    long.insert(0, "preset", preset)
    return long


def copy_grids(work: Path, out: Path) -> list[str]:
    """The main pipeline's sample grids (teacher DDIM at 16 steps, each student at its steps) into ``out/grids``."""
    store = CheckpointStore(str(work / "store"))
    cfg = _cfg(work, MAIN)
    keys = {cfg.distill.start_steps: jobs.teacher_key(MAIN)}
    keys |= {s: jobs.round_key(MAIN, round_index=i, student_steps=s)
             for i, (_, s) in enumerate(cfg.distill.rounds(), start=1)}
    (out / "grids").mkdir(parents=True, exist_ok=True)
    names = []
    for steps, key in sorted(keys.items(), reverse=True):
        grid = evaluation.grid_key(key, sampler="ddim", steps=steps)
        if store.exists(grid):
            name = f"{'teacher' if key.endswith('teacher') else 'distilled'}-{steps:02d}-steps.png"
            (out / "grids" / name).write_bytes(store.get_bytes(grid))
            names.append(name)
    return names


def _remember(work: Path, walls: dict[str, float]) -> dict[str, float]:
    """Wall seconds per stage of the run that did its work (a rerun does none): kept in <work>/walls.json."""
    recorded = work / "walls.json"
    kept = json.loads(recorded.read_text()) if recorded.exists() else {}
    kept.update({k: round(v, 1) for k, v in walls.items() if k not in kept})
    recorded.write_text(json.dumps(kept, indent=2) + "\n")
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/your_model"), help="teacher, store, MLflow, logs")
    p.add_argument("--report-only", action="store_true", help="only rebuild the results from a finished --work")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every pipeline (e.g. a quick trial run); not for RESULTS.md")
    p.add_argument("--teacher-updates", type=int, help="updates of the teacher training (default: the script's)")
    p.add_argument("--out", type=Path, default=OUT, help="where results.csv, results.json, RESULTS.md go")
    p.add_argument("--only", help="run only these pipelines (comma-separated names), then stop before the report")
    args = p.parse_args()
    work = args.work.resolve()
    teacher_args = ["--updates", str(args.teacher_updates)] if args.teacher_updates else []
    only = args.only.split(",") if args.only else None
    unknown = [n for n in only or [] if n not in commands(work, extra=[])]
    if unknown:
        p.error(f"--only: unknown pipeline {unknown[0]!r}; choose from {', '.join(commands(work, extra=[]))}")
    walls = {} if args.report_only else run_all(work, extra=args.overrides, teacher_args=teacher_args, only=only)
    if only:
        _remember(work, walls)
        return
    df, facts = collect(work, extra=args.overrides)
    facts["grids"] = copy_grids(work, args.out)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    from benchmarks.speed.common import machine
    from benchmarks.your_model.report import results_markdown

    if facts["baseline_seconds"] > 10:  # measured now, not read from the cache
        walls["baselines"] = facts["baseline_seconds"]
    kept = _remember(work, walls)
    summary = {"machine": machine(), "commands": {k: shlex.join(v) for k, v in commands(work, extra=[]).items()},
               "walls": kept, "teacher_training": json.loads((work / "teacher" / "train.json").read_text()),
               **facts}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    results = out / "RESULTS.md"
    old = results.read_text() if results.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else f"{NOTES}\n\n(to be written)\n"
    results.write_text(results_markdown(df, summary, store=work / "store") + "\n" + notes)
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {results}")


if __name__ == "__main__":
    main()
