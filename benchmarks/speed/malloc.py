"""The glibc malloc setting (pd_core.malloc_env) on and off: evaluation sampling and training, in child processes.

    python -m benchmarks.speed.malloc                 # 3 rounds, fmnist-cpu U-Net, 1 thread per child
    python -m benchmarks.speed.malloc --rounds 1 --no-write
    python -m benchmarks.speed.malloc --only reexec   # what `pd` re-executing itself to get the setting costs

glibc reads GLIBC_TUNABLES only when a process starts, so each measurement is a fresh child
process (``benchmarks.speed.eval_sampling`` and ``benchmarks.speed.precision`` with ``--json``),
started without the setting (and with ``PD_MALLOC_TUNABLES=0``) or with it. Within a round both
settings run, in swapped order every other round (ABBA), so drift on a shared machine hits both.
Reported: medians over rounds of each child's median seconds, wall and CPU (user + system of the
process: on a loaded machine the robust measure of the work, as it leaves out the time spent
waiting for a core), the ratios on / off (medians of the per-round ratios), and each child's
system CPU time (the kernel's share: page faults and zero-filling of the buffers glibc maps and
unmaps).
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
from pd_core.malloc_env import MALLOC_TUNABLES, OPT_OUT, VARIABLE, with_malloc_tunables

CHILDREN = {
    "sampling": ["benchmarks.speed.eval_sampling", "--variants", "b200-fp32,b200-bf16,b64-bf16", "--num", "400",
                 "--steps", "4", "--repeats", "2"],
    "training": ["benchmarks.speed.precision", "--repeats", "4"],
}


def child_env(*, on: bool) -> dict[str, str]:
    """This environment with the malloc setting (on) or without any glibc.malloc tunable (off), 1 thread."""
    env = {k: v for k, v in os.environ.items() if k not in (VARIABLE, OPT_OUT)}
    env["OMP_NUM_THREADS"] = "1"
    return with_malloc_tunables(env) if on else {**env, OPT_OUT: "0"}


def run_child(module_args: list[str], *, on: bool) -> dict:
    """One child process: its JSON medians plus its user and system CPU seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", *module_args, "--no-write", "--json", str(out)], env=child_env(on=on),
                       check=True, stdout=subprocess.DEVNULL, timeout=3600)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads(out.read_text())
    result["system_s"] = after.ru_stime - before.ru_stime
    result["user_s"] = after.ru_utime - before.ru_utime
    return result


def reexec_cost(*, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of ``pd presets`` started without the setting (so ``pd`` re-executes itself
    to get it), opted out (``PD_MALLOC_TUNABLES=0``: no re-exec, no setting) and started with it."""
    base = {k: v for k, v in os.environ.items() if k not in (VARIABLE, OPT_OUT)}
    envs = {"reexec": base, "opted_out": {**base, OPT_OUT: "0"}, "set_at_start": with_malloc_tunables(base)}
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in envs}
    with tempfile.TemporaryDirectory() as home:
        for i in range(rounds):
            for name in (list(envs) if i % 2 == 0 else list(envs)[::-1]):
                before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                subprocess.run([sys.executable, "-m", "flows.cli", "presets"], env={**envs[name], "PD_HOME": home},
                               check=True, stdout=subprocess.DEVNULL, timeout=300)
                wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
                got[name].append((wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)))
    return {k: (median([w for w, _ in v]), median([c for _, c in v])) for k, v in got.items()}


def measure(*, rounds: int, children: dict[str, list[str]]) -> dict:
    runs: dict[tuple[str, bool], list[dict]] = {(c, on): [] for c in children for on in (False, True)}
    for i in range(rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        for name, args in children.items():
            for on in order:
                r = run_child(args, on=on)
                runs[(name, on)].append(r)
                print(f"round {i + 1}/{rounds} {name} malloc {'on ' if on else 'off'}: "
                      + ", ".join(f"{k} {v:.3f} s ({r['cpu_seconds'][k]:.3f} CPU)" for k, v in r["seconds"].items())
                      + f"; system {r['system_s']:.1f} s, user {r['user_s']:.1f} s; load {os.getloadavg()[0]:.2f}",
                      flush=True)
    out = {}
    for name in children:
        off, on = runs[(name, False)], runs[(name, True)]
        for key in off[0]["seconds"]:
            out[(name, key)] = {f"{kind}{side}": median([r[field][key] for r in runs_])
                                for kind, field in (("", "seconds"), ("cpu_", "cpu_seconds"))
                                for side, runs_ in (("off", off), ("on", on))}
            for kind, field in (("", "seconds"), ("cpu_", "cpu_seconds")):
                out[(name, key)][f"{kind}ratio"] = median([b[field][key] / a[field][key]
                                                           for a, b in zip(off, on, strict=True)])
        out[(name, "system_s")] = {"off": median([r["system_s"] for r in off]),
                                   "on": median([r["system_s"] for r in on])}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=[*sorted(CHILDREN), "reexec"],
                   help="one workload; reexec: what `pd` re-executing itself costs (`pd presets`, 12 rounds)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    print(machine())
    print(f"setting: {VARIABLE}={MALLOC_TUNABLES}; load average at start {os.getloadavg()[0]:.2f}")
    rows = []
    if args.only in (None, "reexec"):
        cost = reexec_cost(rounds=max(12, args.rounds))
        for name, (wall, cpu) in cost.items():
            print(f"pd presets, {name:12s}: {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU (medians)")
            rows.append(row(f"pd_presets_cpu_s_{name}", cpu, "s (CPU)", device=device_name("cpu")))
        rows.append(row("pd_reexec_cost_cpu_s", cost["reexec"][1] - cost["set_at_start"][1], "s (CPU)",
                        device=device_name("cpu")))
    children = {k: v for k, v in CHILDREN.items() if args.only in (None, k)}
    r = measure(rounds=args.rounds, children=children) if children else {}
    for (name, key), v in r.items():
        if key == "system_s":
            print(f"{name:9s} system CPU seconds per child: off {v['off']:.2f}, on {v['on']:.2f}")
            rows.append(row(f"malloc_{name}_child_system_s_off", v["off"], "s", device=device_name("cpu")))
            rows.append(row(f"malloc_{name}_child_system_s_on", v["on"], "s", device=device_name("cpu")))
            continue
        print(f"{name:9s} {key:22s} wall off {v['off']:.3f} s, on {v['on']:.3f} s, on / off {v['ratio']:.3f}; "
              f"CPU off {v['cpu_off']:.3f} s, on {v['cpu_on']:.3f} s, on / off {v['cpu_ratio']:.3f}")
        label = key.replace("/", "_").replace("-", "_")
        rows.append(row(f"malloc_on_over_off_{name}_{label}", v["ratio"], "ratio (wall)", device=device_name("cpu")))
        rows.append(row(f"malloc_on_over_off_{name}_{label}_cputime", v["cpu_ratio"], "ratio (CPU time)",
                        device=device_name("cpu")))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
