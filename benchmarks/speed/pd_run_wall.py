"""Wall time of the real `pd run --preset smoke` process, with and without the early server start.

    python -m benchmarks.speed.pd_run_wall [--repeats 2]

What a user waits for: interpreter start to exit (Prefect's last logs shipped, the server stopped),
measured from outside. Each repeat makes a fresh project home and runs, in it, two new pipelines
(the first creates Prefect's and MLflow's databases, the second finds them), once with `pd run`'s
early start of Prefect's temporary server and once with ``PD_PREFECT_EARLY_START=0`` (Prefect
starts the server at the flow's first client, as it does by itself); the variants alternate and
swap order every repeat, so drift on a shared machine hits both. Medians are reported; the
pipelines' training and evaluation are identical in both (the same seeds), so the difference is
orchestration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.speed.common import machine, row, write_rows
from pd_core.malloc_env import with_malloc_tunables
from tasks.prefect_server import EARLY_START_ENV

VARIANTS = {"early_start": "1", "prefect_starts_server": "0"}
HOMES = ("fresh_home", "existing_home")


def pd_run_wall(*, home: Path, name: str, early_start: str, threads: int) -> float:
    """Seconds from launching ``pd run --preset smoke`` to its exit (exit status 0 required)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PD_STORAGE")}
    env.update({"PD_HOME": str(home), EARLY_START_ENV: early_start})
    env = with_malloc_tunables(env)  # what `pd` would re-execute itself with
    pd = Path(sys.executable).with_name("pd")
    cmd = [str(pd)] if pd.exists() else [sys.executable, "-m", "flows.cli"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "run", "--preset", "smoke", "--name", name, "--set", f"runtime.threads={threads}"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pd run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="runtime.threads of the pipeline (1: steady on a shared box)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    print(machine())
    walls: dict[tuple[str, str], list[float]] = {(v, h): [] for v in VARIANTS for h in HOMES}
    for rep in range(args.repeats):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            home = Path(tempfile.mkdtemp(prefix="pd-run-wall-"))
            try:
                for kind in HOMES:  # two pipelines in one home: the second finds the databases
                    wall = pd_run_wall(home=home, name=f"{kind}-{rep}", early_start=VARIANTS[variant],
                                       threads=args.threads)
                    walls[(variant, kind)].append(wall)
                    print(f"repeat {rep + 1}/{args.repeats} {variant:22s} {kind:14s} {wall:6.1f} s", flush=True)
            finally:
                shutil.rmtree(home, ignore_errors=True)
    rows = []
    for kind in HOMES:
        early = statistics.median(walls[("early_start", kind)])
        late = statistics.median(walls[("prefect_starts_server", kind)])
        print(f"{kind}: early start {early:.1f} s, Prefect starts the server {late:.1f} s, saved {late - early:.1f} s "
              f"(medians of {args.repeats})")
        rows += [row(f"pd_run_wall_s_{kind}", early, f"s (pd run --preset smoke, median of {args.repeats})"),
                 row(f"pd_run_wall_s_{kind}_prefect_starts_server", late,
                     f"s (same with {EARLY_START_ENV}=0, median of {args.repeats})")]
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
