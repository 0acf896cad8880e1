"""The paper's two ablations at our scale, each one ``pd sweep``.

    python -m benchmarks.ablations.reproduce --ablation 1 --work /work/runs/abl1
    python -m benchmarks.ablations.reproduce --ablation 2 --work /work/runs/abl2 --teacher-uri URI
    python -m benchmarks.ablations.reproduce --ablation 1 --tiny --work /tmp/abl1   # the CI size (smoke preset)
    python -m benchmarks.ablations.reproduce --ablation 1 --dry-run                   # the command and points only

Ablation 1 (Salimans & Ho, Table 1: output parameterization x loss weighting): one teacher per
combination of diffusion.parameterization in {eps, x, v, both} and diffusion.weighting in {snr,
snr_trunc, snr_plus_one}, except eps with snr_trunc (it diverges, paper Table 1; the config refuses
it), all with the same budget; each teacher evaluated by DDIM at 8, 4, 2 and 1 steps and distilled
8 -> 4 -> 2 -> 1. Cut to fit ~3 h on 2 CPU cores (fmnist-cpu): TEACHER_UPDATES teacher updates
instead of 12000, rounds from 8 steps instead of 32, ROUND_UPDATES updates per round.

Ablation 2 (the fast schedule, Section 4 / Fig. 4: 50k vs 10k updates per round): distill.fast_factor
in {1, 2, 5} (updates per round 1x, 1/2x, 1/5x) x pipeline.seed in SEEDS, every point distilling the
same imported teacher (``--teacher-uri``: the quality benchmark's) 8 -> 1 with fmnist-cpu's round
updates. The spread over seeds is the question: the factor's effect is reported as mean and standard
deviation over seeds of the distilled FD at each step count, and of the paired difference to 1x
(same seed).

Writes to ``--out`` (default: this folder; the tiny mode writes only under ``--work``):
``ablation<K>_results.csv``, the quality long format (sampler, steps, metric, value, n_samples,
seconds_per_image) of every point plus ``point`` and the grid columns; ``ablation<K>_summary.csv``
(ablation 2: per factor and step count, mean and std over seeds, and of the paired difference).
"""

from __future__ import annotations

import argparse
import io
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

OUT = Path(__file__).resolve().parent
PRESET = "fmnist-cpu"
TEACHER_UPDATES = 800
ROUND_UPDATES = 100
SEEDS = (0, 1, 2)
FACTORS = (1, 2, 5)
PARAMETERIZATIONS = ("eps", "x", "v", "both")
WEIGHTINGS = ("snr", "snr_trunc", "snr_plus_one")
ABLATION1 = [f"teacher.updates={TEACHER_UPDATES}", "distill.start_steps=8",
             f"distill.updates_per_round={ROUND_UPDATES}", "distill.last_rounds_updates=null",
             "eval.stochastic_gammas=[]", "eval.teacher_extra_steps=[]"]
ABLATION2 = ["distill.start_steps=8", "distill.fast=true", "eval.stochastic_gammas=[]"]
# The CI size: the smoke preset, a few updates, 100 samples per measurement.
TINY = ["teacher.updates=20", "distill.start_steps=2", "distill.updates_per_round=5", "eval.num_samples=100",
        "eval.kid_subset_size=50", "eval.stochastic_gammas=[]", "eval.classifier_epochs=1", "eval.grid_size=2"]


def grid(ablation: int, *, tiny: bool, seeds: Sequence[int]) -> dict:
    """The sweep's grid file content."""
    if ablation == 1:
        kinds = (("x", "v"), ("snr_trunc", "snr_plus_one")) if tiny else (PARAMETERIZATIONS, WEIGHTINGS)
        return {"grid": {"diffusion.parameterization": list(kinds[0]), "diffusion.weighting": list(kinds[1])},
                "exclude": [{"diffusion.parameterization": "eps", "diffusion.weighting": "snr_trunc"}]}
    return {"grid": {"distill.fast_factor": list((1, 5) if tiny else FACTORS), "pipeline.seed": list(seeds)}}


def sweep_command(ablation: int, *, work: Path, tiny: bool, teacher_uri: str | None, grid_file: Path) -> list[str]:
    """The ``pd sweep`` command line of an ablation."""
    overrides = (TINY if tiny else []) + ((ABLATION1 if not tiny else []) if ablation == 1 else
                                        (ABLATION2 if not tiny else ["distill.fast=true"]))
    if teacher_uri:
        overrides = [*overrides, f"pipeline.teacher_uri={teacher_uri}"]
    return ["pd", "sweep", "--preset", "smoke" if tiny else PRESET, "--name", sweep_name(ablation, tiny=tiny),
            "--storage", str(work / "store"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
            "--grid-file", str(grid_file), *[a for o in overrides for a in ("--set", o)]]


def sweep_name(ablation: int, *, tiny: bool) -> str:
    return f"ablation{ablation}{'-tiny' if tiny else ''}"


def results(store: Path, comparison: pd.DataFrame, fields: Sequence[str]) -> pd.DataFrame:
    """Every point's quality_long.csv with ``point`` and its grid values in front."""
    frames = []
    for record in comparison.to_dict(orient="records"):
        path = store / "pipelines" / record["point"] / "report" / "quality_long.csv"
        if not path.exists():
            continue
        long = pd.read_csv(path)
        for position, column in enumerate(["point", *fields]):
            long.insert(position, column, record[column])
        frames.append(long)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def seed_spread(comparison: pd.DataFrame, *, fd_name: str) -> pd.DataFrame:
    """Ablation 2: per factor and step count, the distilled FD's mean and std over seeds, and the mean and std of
    its paired difference to factor 1 (same seed)."""
    prefix = f"distilled_{fd_name}_"
    columns = [c for c in comparison.columns if c.startswith(prefix) and c.endswith("steps")]
    rows = []
    base = comparison[comparison["distill.fast_factor"].astype(str) == "1"].set_index("pipeline.seed")
    for factor, group in comparison.groupby(comparison["distill.fast_factor"].astype(str), sort=False):
        group = group.set_index("pipeline.seed")
        for column in columns:
            steps = int(column[len(prefix):-len("steps")])
            diff = (group[column] - base[column].reindex(group.index)).dropna()
            rows.append({"fast_factor": factor, "steps": steps, "seeds": int(group[column].notna().sum()),
                         f"{fd_name}_mean": group[column].mean(), f"{fd_name}_std": group[column].std(ddof=1),
                         "diff_vs_1x_mean": diff.mean(), "diff_vs_1x_std": diff.std(ddof=1)})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablations.reproduce", description=__doc__.split("\n")[0])
    p.add_argument("--ablation", type=int, choices=(1, 2), required=True)
    p.add_argument("--work", type=Path, default=Path("/work/runs/ablations"), help="store and MLflow of the sweep")
    p.add_argument("--out", type=Path, default=None, help="where results go (default: this folder; --tiny: --work)")
    p.add_argument("--teacher-uri", help="ablation 2: the teacher every point distils (a checkpoint folder URI)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="ablation 2: pipeline seeds, comma-separated")
    p.add_argument("--tiny", action="store_true", help="the smoke preset, a few updates: checks the machinery")
    p.add_argument("--dry-run", action="store_true", help="print the pd sweep command, its grid and points (every "
                                                          "point's config resolved); train nothing")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.ablation == 2 and not args.tiny and not args.teacher_uri and not args.dry_run:
        p.error("--ablation 2 needs --teacher-uri (a trained teacher's checkpoint folder, e.g. the quality "
                "benchmark's), so that only the distillation varies between seeds")
    name = sweep_name(args.ablation, tiny=args.tiny)
    work = args.work.resolve()
    grid_file = work / f"{name}-grid.yaml"
    command = sweep_command(args.ablation, work=work, tiny=args.tiny, teacher_uri=args.teacher_uri,
                            grid_file=grid_file)
    content = grid(args.ablation, tiny=args.tiny, seeds=seeds)
    print(shlex.join(command))
    print(yaml.safe_dump(content, sort_keys=False).strip())
    work.mkdir(parents=True, exist_ok=True)
    grid_file.write_text(yaml.safe_dump(content, sort_keys=False))
    pd_bin = Path(sys.executable).with_name("pd")
    done = subprocess.run([str(pd_bin) if pd_bin.exists() else "pd", *command[1:], *(["--dry-run"] if args.dry_run
                                                                                     else [])], check=False)
    if done.returncode != 0 or args.dry_run:
        return done.returncode
    comparison = pd.read_csv(io.BytesIO((work / "store" / "sweeps" / name / "comparison.csv").read_bytes()), dtype={
        k: str for k in content["grid"]})
    out = args.out or (work if args.tiny else OUT)
    out.mkdir(parents=True, exist_ok=True)
    results(work / "store", comparison, list(content["grid"])).to_csv(out / f"ablation{args.ablation}_results.csv",
                                                                       index=False)
    if args.ablation == 2:
        fd_name = next(c.split("_", 1)[1].rsplit("_", 1)[0] for c in comparison.columns
                       if c.startswith("distilled_fd_") or c.startswith("distilled_fid_"))
        summary = seed_spread(comparison, fd_name=fd_name)
        summary.to_csv(out / "ablation2_summary.csv", index=False)
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
