"""Data-parallel throughput on CPU: 2 gloo processes (1 thread each) vs 1 process (2 threads), same global batch.

    python -m benchmarks.speed.ddp_throughput                        # smoke U-Net, global batch 128
    python -m benchmarks.speed.ddp_throughput --preset fmnist-cpu --global-batch 64 --steps 4

Distillation updates (the production ``train_step`` with ``distill_loss_fn``; the 2-process run
wraps the student in DistributedDataParallel and every rank takes half of the global batch) are
timed after warm-up; the two configurations alternate, ``--trials`` times each, medians. On this
2-core machine both configurations use both cores, so the ratio measures what DDP costs (gradient
all-reduce over gloo, a second process) rather than what it gains; on GPUs each rank brings its
own device and throughput scales with the number of GPUs (not measured here: no GPU).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.speed.models import workload
from pd_core.dist import rank_seed
from pd_core.net import free_port
from pd_core.schedule import COSINE
from pd_core.train import Runtime, TrainState, data_parallel, distill_loss_fn, train_step
from pd_core.unet import UNet


def _worker(rank: int, world: int, port: int, preset: str, global_batch: int, steps: int, out: str) -> None:
    torch.set_num_threads(2 // world if world <= 2 else 1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        w = workload(preset, batch=global_batch // world)
        runtime = Runtime(device=torch.device("cpu"), autocast_dtype=None, channels_last=False, compile=False,
                          rank=rank, world_size=world)
        torch.manual_seed(0)
        student = UNet(w.spec)
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        state = TrainState(model=student, optimizer=torch.optim.AdamW(student.parameters(), lr=1e-5), ema=None,
                           step=0, noise_generator=torch.Generator().manual_seed(rank_seed(0, rank)))
        net = data_parallel(student, runtime)
        loss_fn = distill_loss_fn(net=net, teacher_net=teacher, student_steps=4, diffusion_cfg=w.cfg.diffusion,
                                  generator=state.noise_generator, schedule=COSINE)
        params = list(student.parameters())
        x = w.images(seed=rank)

        def update():
            train_step(state=state, loss_fn=loss_fn, x=x, y=None, lr=1e-5, runtime=runtime, params=params,
                       grad_clip=1.0)

        for _ in range(2):
            update()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            update()
        if world > 1:
            dist.barrier()
        seconds = time.perf_counter() - t0
        if rank == 0:
            Path(out).write_text(str(global_batch * steps / seconds))
    finally:
        if world > 1:
            dist.destroy_process_group()


def images_per_s(world: int, *, preset: str, global_batch: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rate")
        mp.spawn(_worker, args=(world, free_port(), preset, global_batch, steps, out), nprocs=world,
                 join=True)
        return float(Path(out).read_text())


def main(argv: list[str] | None = None) -> None:
    from benchmarks.speed.common import machine, row, write_rows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smoke")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    print(machine())
    print(workload(args.preset, batch=args.global_batch).describe().replace("batch", "global batch"))
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.trials):
        for world in (1, 2):
            rates[world].append(images_per_s(world, preset=args.preset, global_batch=args.global_batch,
                                             steps=args.steps))
            print(f"  {world} process(es): {rates[world][-1]:.1f} images/s")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"1 process x 2 threads: {one:.1f} images/s; 2 gloo processes x 1 thread: {two:.1f} images/s; "
          f"ratio {two / one:.3f}")
    suffix = "" if args.preset == "smoke" else f"_{args.preset.replace('-', '_')}"
    rows = [row(f"ddp_2proc_throughput{suffix}", two, "images/s (distillation updates, 2 gloo procs x 1 thread)"),
            row(f"ddp_1proc_throughput{suffix}", one, "images/s (distillation updates, 1 proc x 2 threads)"),
            row(f"ddp_2proc_over_1proc_throughput{suffix}", two / one, "ratio")]
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
