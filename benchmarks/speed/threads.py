"""torch threads on a shared CPU: 1 against 2 threads, with the other core idle and with it busy.

    python -m benchmarks.speed.threads                          # fmnist-cpu teacher updates, bf16, 4 rounds
    python -m benchmarks.speed.threads --variants 1,2,2p --rounds 2 --no-write

A variant is a thread count, ``p`` appended for ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep
at a barrier instead of spinning), or ``auto``: ``runtime.threads`` null, the threads following the
measured load (pd_core.train.threads). Each measurement is a fresh child process (OpenMP reads its
settings at start) that times teacher updates of the preset's U-Net (the production
``train_step``, ``--precision`` autocast, the load re-checked before every update as the training
loop does), after a warm-up. Condition ``busy``: the benchmark
starts a second process that spins on one core (a Python busy loop) for the duration of the
child; ``idle``: it starts nothing. Both conditions and all variants run within every round, the
variants in swapped order every other round; medians over rounds.

What else ran is measured, not assumed: from /proc/stat, the cores that processes other than this
benchmark and its children kept busy during each child (``others``), reported with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.speed.common import device_name, machine, median, row, write_rows
from pd_core.malloc_env import with_malloc_tunables

SPIN = "while True:\n    pass\n"


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def child_env(variant: str) -> dict[str, str]:
    """Environment of a child for variant ``N``, ``Np`` (passive waiting) or ``auto``, with the malloc setting."""
    env = with_malloc_tunables({k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")})
    if variant != "auto":
        env["OMP_NUM_THREADS"] = variant.rstrip("p")
    if variant.endswith("p"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run_child(*, variant: str, busy: bool, preset: str, precision: str, updates: int) -> dict:
    """One measurement in a fresh process; returns its median seconds per update and the others' load."""
    hz = os.sysconf("SC_CLK_TCK")
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            ours0, (b0, _) = resource.getrusage(resource.RUSAGE_CHILDREN), busy_jiffies()
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "benchmarks.speed.threads", "--child", "--preset", preset,
                            "--precision", precision, "--updates", str(updates), "--json", str(out),
                            "--variants", variant],
                           env=child_env(variant), check=True, timeout=1800)
            result = json.loads(out.read_text())
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    wall = time.perf_counter() - t0
    ours1, (b1, _) = resource.getrusage(resource.RUSAGE_CHILDREN), busy_jiffies()
    ours_s = (ours1.ru_utime + ours1.ru_stime) - (ours0.ru_utime + ours0.ru_stime)  # child + spinner
    result["others_cores"] = max(0.0, ((b1 - b0) / hz - ours_s) / wall)
    return result


def child(preset: str, *, variant: str, precision: str, updates: int, json_path: str) -> None:
    """Time ``updates`` teacher updates (after 2 of warm-up) in this process; write the median to ``json_path``."""
    import torch

    from benchmarks.speed.models import workload
    from pd_core.train import TrainState, resolve_runtime, teacher_loss_fn, train_step
    from pd_core.unet import UNet

    w = workload(preset)
    threads = None if variant == "auto" else int(variant.rstrip("p"))
    runtime = resolve_runtime(w.cfg.runtime.model_copy(update={"precision": precision, "threads": threads}))
    torch.manual_seed(0)
    net = UNet(w.spec)
    state = TrainState(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-5), ema=None, step=0,
                       noise_generator=torch.Generator().manual_seed(0))
    loss_fn = teacher_loss_fn(net=net, diffusion_cfg=w.cfg.diffusion, generator=state.noise_generator)
    params, x = list(net.parameters()), w.images()
    times = []
    for i in range(updates + 2):
        t0 = time.perf_counter()
        runtime.follow_load()
        train_step(state=state, loss_fn=loss_fn, x=x, y=None, lr=1e-5, runtime=runtime, params=params, grad_clip=1.0)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    Path(json_path).write_text(json.dumps({"s_per_update": median(times), "threads": torch.get_num_threads()}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fmnist-cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--variants", default="1,2,2p,auto",
                   help="thread counts, 'p' for OMP_WAIT_POLICY=PASSIVE, auto for runtime.threads null")
    p.add_argument("--conditions", default="idle,busy")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--updates", type=int, default=8, help="timed teacher updates per child")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.preset, variant=args.variants, precision=args.precision, updates=args.updates,
              json_path=args.json)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if any(c not in ("idle", "busy") for c in conditions):
        raise SystemExit(f"error: --conditions must be idle and/or busy, got {args.conditions!r}")
    print(machine())
    print(f"preset {args.preset}, precision {args.precision}, {args.updates} timed teacher updates per child; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    got: dict[tuple[str, str], list[dict]] = {(c, v): [] for c in conditions for v in variants}
    for i in range(args.rounds):
        order = variants if i % 2 == 0 else variants[::-1]
        for cond in conditions:
            for v in order:
                r = run_child(variant=v, busy=cond == "busy", preset=args.preset, precision=args.precision,
                              updates=args.updates)
                got[(cond, v)].append(r)
                print(f"round {i + 1}/{args.rounds} {cond:4s} threads {v:4s}: {r['s_per_update']:.3f} s/update "
                      f"with {r['threads']} thread(s) at the end (others kept {r['others_cores']:.2f} cores busy)",
                      flush=True)
    rows = []
    for cond in conditions:
        base = median([r["s_per_update"] for r in got[(cond, variants[0])]])
        for v in variants:
            s = median([r["s_per_update"] for r in got[(cond, v)]])
            others = median([r["others_cores"] for r in got[(cond, v)]])
            print(f"{cond:4s} threads {v:4s}: {s:.3f} s/update (x{s / base:.2f} of {variants[0]} thread(s)); "
                  f"others' load {others:.2f} cores (median)")
            rows.append(row(f"teacher_update_s_{args.precision}_threads_{v}_{cond}", s, "s", device=device_name("cpu")))
            rows.append(row(f"others_load_cores_threads_{v}_{cond}", others, "cores", device=device_name("cpu")))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
