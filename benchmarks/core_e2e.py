"""Tiny end-to-end check of pd_core: teacher -> progressive distillation -> samplers, on 2-D data.

Trains a small MLP teacher (x parameterization, truncated-SNR weighting, t ~ U[0, 1)) on a mixture of
eight Gaussians in [-1, 1]^2, distills it round by round (2N -> N, Algorithm 2, via
pd_core.distill.DistillationLoss), and compares, at each step count N, the distilled N-step DDIM sampler
with the teacher's N-step DDIM sampler by the energy distance to fresh data samples (lower is better;
the data-vs-data value at the same sample size is the floor).

2-D points travel as (B, 2, 1, 1) tensors so the (B, C, H, W) code paths are the ones exercised.

    python benchmarks/core_e2e.py                 # full run, writes benchmarks/core_e2e.md
    python benchmarks/core_e2e.py --quick         # the settings of tests/test_e2e_core.py
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.core_e2e_data import energy_distance, sample_data  # noqa: E402
from benchmarks.core_e2e_model import E2EConfig, distill_round, train_teacher  # noqa: E402
from pd_core import samplers  # noqa: E402
from pd_core.denoiser import Denoiser  # noqa: E402


def evaluate(denoiser: Denoiser, *, num_steps: int, cfg: E2EConfig, ref: np.ndarray, sampler: str = "ddim") -> float:
    """Energy distance of ``eval_samples`` generated points to the reference points (same noise for every model)."""
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    z = torch.randn(cfg.eval_samples, 2, 1, 1, generator=g)  # (n, 2, 1, 1), the t = 1 noise
    x = getattr(samplers, sampler)(denoiser, z, num_steps=num_steps)
    return energy_distance(x.numpy(), ref)


def run(cfg: E2EConfig, *, log=print) -> dict:
    """Train the teacher, distill round by round, evaluate each student against the teacher at its N."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    ref = sample_data(cfg.eval_samples, generator=torch.Generator().manual_seed(cfg.seed + 999)).numpy()
    ref2 = sample_data(cfg.eval_samples, generator=torch.Generator().manual_seed(cfg.seed + 998)).numpy()
    t0 = time.perf_counter()
    teacher = train_teacher(cfg, generator=g)
    timings = {"teacher_s": time.perf_counter() - t0}
    teacher_full = evaluate(teacher, num_steps=cfg.teacher_steps, cfg=cfg, ref=ref)
    log(f"teacher trained in {timings['teacher_s']:.1f}s; teacher DDIM {cfg.teacher_steps} steps: "
        f"energy distance {teacher_full:.5f}")
    rows = []
    current, n = teacher, cfg.teacher_steps
    t0 = time.perf_counter()
    while n > cfg.final_steps:
        n //= 2
        t1 = time.perf_counter()
        current = distill_round(current, student_steps=n, cfg=cfg, generator=g)
        round_s = time.perf_counter() - t1
        row = dict(steps=n, distilled=evaluate(current, num_steps=n, cfg=cfg, ref=ref),
                   teacher_ddim=evaluate(teacher, num_steps=n, cfg=cfg, ref=ref), round_s=round_s)
        if cfg.heun_baseline:
            row["teacher_heun"] = evaluate(teacher, num_steps=n, cfg=cfg, ref=ref, sampler="heun")
        rows.append(row)
        log(f"N={n:4d}  distilled {row['distilled']:.5f}  teacher DDIM {row['teacher_ddim']:.5f}"
            + (f"  teacher Heun {row['teacher_heun']:.5f}" if cfg.heun_baseline else "") + f"  (round {round_s:.1f}s)")
    timings["distill_s"] = time.perf_counter() - t0
    return dict(config=asdict(cfg), rows=rows, teacher_full=teacher_full, floor=energy_distance(ref2, ref),
                timings=timings)


QUICK = E2EConfig(teacher_updates=1200, teacher_steps=8, updates_per_round=250, batch_size=256, eval_samples=1000,
                  heun_baseline=False)


def table(res: dict) -> str:
    cfg = res["config"]
    heun = cfg["heun_baseline"]
    head = "| N | distilled, DDIM (N evals) | teacher, DDIM (N evals) |"
    head += " teacher, Heun (2N-1 evals) |" if heun else ""
    sep = "|---:|---:|---:|" + ("---:|" if heun else "")
    lines = [head, sep]
    for r in res["rows"]:
        lines.append(f"| {r['steps']} | {r['distilled']:.4f} | {r['teacher_ddim']:.4f} |"
                     + (f" {r['teacher_heun']:.4f} |" if heun else ""))
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return (f"{cpu}, {os.cpu_count()} logical CPUs (torch threads: {torch.get_num_threads()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"{platform.system()}")


def write_markdown(res: dict, path: Path, *, command: str, quick: dict | None = None) -> None:
    cfg = res["config"]
    t = res["timings"]
    text = f"""# pd_core end-to-end check: progressive distillation on 2-D data

Command: `{command}`
Machine: {machine()} (CPU only; the machine was shared with other jobs, so times are indicative).
Seed {cfg['seed']}. Data: mixture of 8 Gaussians (std 0.05) on a circle of radius 0.75, points as (B, 2, 1, 1).

Teacher: MLP (width {cfg['hidden']}, time input phi(lambda) with the U-Net's sinusoidal embedding),
`{cfg['parameterization']}` parameterization, `{cfg['weighting']}` weighting, continuous t ~ U[0, 1),
{cfg['teacher_updates']} AdamW updates (lr {cfg['teacher_lr']}, batch {cfg['batch_size']}, warmup 200, grad clip 1,
EMA 0.995). Distillation: {cfg['teacher_steps']} -> {cfg['final_steps']} steps, Algorithm 2 via
`pd_core.distill.DistillationLoss`, {cfg['updates_per_round']} AdamW updates per round (lr {cfg['distill_lr']} linearly
annealed to 0, batch {cfg['batch_size']}, fresh optimizer per round, student initialised from its teacher).

Metric: energy distance (float64; lower is better) between {cfg['eval_samples']} generated points and
{cfg['eval_samples']} fresh data points; every sampler starts from the same seeded noise, clipping on.
Floor (data vs. independent data, same n): {res['floor']:.4f}. Teacher, DDIM {cfg['teacher_steps']} steps:
{res['teacher_full']:.4f}.

{table(res)}

Time: teacher {t['teacher_s']:.0f} s, distillation (all rounds, with evaluation) {t['distill_s']:.0f} s.
The within-sample terms of the energy distance are unbiased, so values near 0 can come out slightly
negative (the floor). Heun at N = 1 is the same single x_hat evaluation as DDIM at N = 1.
"""
    if quick is not None:
        qc = quick["config"]
        text += f"""
## Quick mode (the settings of `tests/test_e2e_core.py`, `python benchmarks/core_e2e.py --quick`)

{qc['teacher_updates']} teacher updates, distillation {qc['teacher_steps']} -> {qc['final_steps']} with
{qc['updates_per_round']} updates per round, batch {qc['batch_size']}, {qc['eval_samples']} evaluation points,
seed {qc['seed']}. Teacher, DDIM {qc['teacher_steps']} steps: {quick['teacher_full']:.4f}; floor {quick['floor']:.4f}.
Time: {quick['timings']['teacher_s'] + quick['timings']['distill_s']:.0f} s. The test asserts distilled <
teacher DDIM / 2.5 at N = 1 and 2.

{table(quick)}
"""
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the settings of tests/test_e2e_core.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="markdown results file (default: benchmarks/core_e2e.md, "
                                               "not written with --quick unless given)")
    args = p.parse_args(argv)
    cfg = replace(QUICK if args.quick else E2EConfig(), seed=args.seed)
    res = run(cfg)
    print()
    print(f"energy distance to data (n={cfg.eval_samples}; floor {res['floor']:.4f}; "
          f"teacher DDIM {cfg.teacher_steps} steps {res['teacher_full']:.4f})")
    print(table(res))
    out = args.out or (None if args.quick else str(Path(__file__).with_suffix(".md")))
    if out:
        command = "python benchmarks/core_e2e.py" + (" --quick" if args.quick else "") + \
            (f" --seed {args.seed}" if args.seed else "") + (f" --out {args.out}" if args.out else "")
        quick = None
        if not args.quick:
            print("\nquick mode (tests/test_e2e_core.py settings):")
            quick = run(replace(QUICK, seed=args.seed))
        write_markdown(res, Path(out), command=command, quick=quick)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
