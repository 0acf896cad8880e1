"""Multi-node throughput on one CPU machine: a round on two one-process nodes against one two-process node.

    python -m benchmarks.speed.multinode                 # smoke U-Net, global batch 128, 40 updates, 3 trials

Both run the production path (``pd_core.launch.launch_job`` -> torchrun -> ``jobs.run_round``, gloo,
1 thread per process) with the same global batch: one node of 2 processes (``--standalone``,
distill.batch_size 64) and two nodes of 1 process (two torchrun agents, c10d rendezvous on 127.0.0.1,
distill.batch_size 128, so 64 per process). Images/s = updates x global batch / the round's training
time (the loop, as the round reports it); the launch-to-result wall time (imports, rendezvous, data,
the checkpoint) is reported beside it. The two layouts alternate within each trial; medians. On one
machine both layouts use the same two cores and the same loopback all-reduce, so the ratio measures
what the multi-node machinery (c10d rendezvous, two agents) costs, not what more nodes gain.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pd_core import jobs, launch
from pd_core.config import load_config
from pd_core.store import CheckpointStore

GLOBAL_BATCH = 128


def _cfg(store: Path, name: str, *, nodes: int, updates: int) -> object:
    nproc, batch = (1, GLOBAL_BATCH) if nodes == 2 else (2, GLOBAL_BATCH // 2)
    return load_config(preset="smoke", overrides=[
        f"pipeline.name={name}", f"storage.root={store}", "teacher.updates=2", "teacher.batch_size=64",
        f"distill.updates_per_round={updates}", f"distill.log_every={updates}", f"distill.checkpoint_every={updates}",
        f"distill.batch_size={batch}", f"runtime.nproc={nproc}", f"runtime.nodes={nodes}", "runtime.threads=1",
        "eval.enabled=false"])


def main(argv: list[str] | None = None) -> None:
    from benchmarks.speed.common import machine, row, write_rows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    print(machine())
    rates: dict[int, list[float]] = {1: [], 2: []}
    walls: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        teacher = jobs.ensure_teacher(_cfg(store, "teacher", nodes=1, updates=args.updates),
                                      CheckpointStore(str(store)))
        for trial in range(args.trials):
            for nodes in (1, 2):
                cfg = _cfg(store, f"n{nodes}-t{trial}", nodes=nodes, updates=args.updates)
                t0 = time.perf_counter()
                info = launch.launch_job(cfg, job="round", round_index=1, teacher=teacher, log_line=lambda _: None)
                walls[nodes].append(time.perf_counter() - t0)
                rates[nodes].append(args.updates * GLOBAL_BATCH / info.train_seconds)
                print(f"  {nodes} node(s): {rates[nodes][-1]:.0f} images/s, launch to result {walls[nodes][-1]:.1f} s")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    one_wall, two_wall = statistics.median(walls[1]), statistics.median(walls[2])
    print(f"1 node x 2 processes: {one:.0f} images/s ({one_wall:.1f} s launch to result); 2 nodes x 1 process: "
          f"{two:.0f} images/s ({two_wall:.1f} s); ratio {two / one:.3f}")
    rows = [row("multinode_2x1_throughput", two, "images/s (round, 2 nodes x 1 gloo proc, c10d on 127.0.0.1)"),
            row("multinode_1x2_throughput", one, "images/s (round, 1 node x 2 gloo procs, standalone)"),
            row("multinode_2x1_over_1x2_throughput", two / one, "ratio"),
            row("multinode_2x1_launch_to_result_s", two_wall, "s"),
            row("multinode_1x2_launch_to_result_s", one_wall, "s")]
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
