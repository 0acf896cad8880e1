"""Training updates in fp32 against bf16 autocast on the CPU: teacher and distillation, one process, alternated.

    python -m benchmarks.speed.precision                      # fmnist-cpu U-Net, batch 64, 1 thread
    python -m benchmarks.speed.precision --channels-last      # also bf16 + channels_last

Every variant is the production update (``pd_core.train.train_step`` with ``teacher_loss_fn`` /
``distill_loss_fn``) on the same network, batch and noise stream; only the Runtime differs
(``autocast_dtype`` None or bfloat16, channels_last off or on). The variants are called in turn
within every repeat; ratios are medians of the per-repeat ratios (bf16 time / fp32 time).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from benchmarks.speed.common import device_name, interleaved, machine, median, row, write_rows
from benchmarks.speed.models import workload
from pd_core.schedule import COSINE
from pd_core.train import Runtime, TrainState, distill_loss_fn, teacher_loss_fn, train_step
from pd_core.train.runtime import cpu_supports_bf16
from pd_core.unet import UNet


def _runtime(*, bf16: bool, channels_last: bool) -> Runtime:
    return Runtime(device=torch.device("cpu"), autocast_dtype=torch.bfloat16 if bf16 else None,
                   channels_last=channels_last, compile=False)


def measure(preset: str, *, repeats: int, channels_last: bool, student_steps: int = 4) -> dict:
    """Median seconds per update of each (variant, kind), and the per-repeat ratios against fp32."""
    w = workload(preset)
    variants = {"fp32": _runtime(bf16=False, channels_last=False), "bf16": _runtime(bf16=True, channels_last=False)}
    if channels_last:
        variants["bf16_channels_last"] = _runtime(bf16=True, channels_last=True)
    torch.manual_seed(0)
    base = UNet(w.spec)
    fns = {}
    for name, runtime in variants.items():
        net = copy.deepcopy(base)
        if runtime.channels_last:
            net = net.to(memory_format=torch.channels_last)
        teacher = copy.deepcopy(net).eval().requires_grad_(False)
        state = TrainState(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-5), ema=None, step=0,
                           noise_generator=torch.Generator().manual_seed(0))
        params = list(net.parameters())
        x = w.images()
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        losses = {"teacher": teacher_loss_fn(net=net, diffusion_cfg=w.cfg.diffusion, generator=state.noise_generator),
                  "distill": distill_loss_fn(net=net, teacher_net=teacher, student_steps=student_steps,
                                             diffusion_cfg=w.cfg.diffusion, generator=state.noise_generator,
                                             schedule=COSINE)}
        net.train()
        for kind, loss_fn in losses.items():
            fns[(name, kind)] = (lambda s=state, f=loss_fn, xx=x, r=runtime, p=params:
                                 train_step(state=s, loss_fn=f, x=xx, y=None, lr=1e-5, runtime=r, params=p,
                                            grad_clip=1.0))
    wall, cpu = interleaved(fns, repeats=repeats)
    out = {"workload": w, "seconds": {k: median(v) for k, v in wall.items()},
           "cpu_seconds": {k: median(v) for k, v in cpu.items()}, "ratios": {}}
    out["cpu_ratios"] = {}
    for name in variants:
        for kind in ("teacher", "distill"):
            per = [a / b for a, b in zip(wall[(name, kind)], wall[("fp32", kind)], strict=True)]
            out["ratios"][(name, kind)] = (median(per), min(per), max(per))
            per_cpu = [a / b for a, b in zip(cpu[(name, kind)], cpu[("fp32", kind)], strict=True)]
            out["cpu_ratios"][(name, kind)] = median(per_cpu)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fmnist-cpu")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings on a shared machine)")
    p.add_argument("--channels-last", action="store_true", help="also time bf16 with channels_last")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", help="also write the medians to this JSON file (for a parent benchmark)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"CPU bf16 support (avx512_bf16 / amx_bf16 in /proc/cpuinfo): {cpu_supports_bf16()}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    r = measure(args.preset, repeats=args.repeats, channels_last=args.channels_last)
    print(r["workload"].describe())
    for (name, kind), s in r["seconds"].items():
        ratio, lo, hi = r["ratios"][(name, kind)]
        print(f"{name:20s} {kind:8s} {s * 1e3:8.1f} ms wall, {r['cpu_seconds'][(name, kind)] * 1e3:8.1f} ms CPU; "
              f"/ fp32 {ratio:.3f} wall (per-repeat {lo:.3f}..{hi:.3f}), {r['cpu_ratios'][(name, kind)]:.3f} CPU")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    suffix = "" if args.preset == "fmnist-cpu" else f"_{args.preset.replace('-', '_')}"
    dev = device_name("cpu")
    rows = []
    for (name, kind), s in r["seconds"].items():
        rows.append(row(f"{kind}_update_s_{name}_{args.threads}t{suffix}", s, "s (wall)", device=dev))
        rows.append(row(f"{kind}_update_cpu_s_{name}_{args.threads}t{suffix}", r["cpu_seconds"][(name, kind)],
                        "s (CPU)", device=dev))
        if name != "fp32":
            rows.append(row(f"{kind}_update_{name}_over_fp32_{args.threads}t{suffix}", r["ratios"][(name, kind)][0],
                            "ratio (wall)", device=dev))
            rows.append(row(f"{kind}_update_{name}_over_fp32_{args.threads}t{suffix}_cputime",
                            r["cpu_ratios"][(name, kind)], "ratio (CPU time)", device=dev))
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": {f"{n}/{k}": v for (n, k), v in r["seconds"].items()},
                                               "cpu_seconds": {f"{n}/{k}": v
                                                               for (n, k), v in r["cpu_seconds"].items()}}))
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
