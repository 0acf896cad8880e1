"""Cost of one distillation update relative to one teacher update: same network, same batch, one process.

    python -m benchmarks.speed.step_ratio                 # fmnist-cpu U-Net, batch 64 (the CPU preset)
    python -m benchmarks.speed.step_ratio --preset smoke  # the smoke preset's tiny U-Net

Both updates are the production code (``pd_core.train.train_step`` with ``teacher_loss_fn`` /
``distill_loss_fn``), timed alternately within every repeat; the ratio is the median of the
per-repeat ratios. A teacher update is one forward + backward of the network; a distillation
update adds two teacher forwards without autograd, so the floor is about 1 + 2/3 (backward ~ 2
forwards); the target is <= 1.75.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.speed.common import device_name, interleaved, machine, median, row, write_rows
from benchmarks.speed.models import workload
from pd_core.schedule import COSINE
from pd_core.train import Runtime, TrainState, distill_loss_fn, resolve_runtime, teacher_loss_fn, train_step
from pd_core.unet import UNet


def measure(preset: str, *, repeats: int, batch: int | None = None, device: str = "cpu",
            student_steps: int = 4) -> dict:
    w = workload(preset, batch=batch)
    runtime: Runtime = resolve_runtime(w.cfg.runtime.model_copy(update={"device": device, "precision": "auto"}))
    torch.manual_seed(0)
    net = UNet(w.spec).to(runtime.device)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    state = TrainState(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-5), ema=None, step=0,
                       noise_generator=torch.Generator(device=runtime.device).manual_seed(0))
    params = list(net.parameters())
    x = w.images().to(runtime.device)
    diffusion = w.cfg.diffusion
    losses = {
        "teacher": teacher_loss_fn(net=net, diffusion_cfg=diffusion, generator=state.noise_generator),
        "distill": distill_loss_fn(net=net, teacher_net=teacher, student_steps=student_steps,
                                   diffusion_cfg=diffusion, generator=state.noise_generator, schedule=COSINE),
    }
    net.train()

    def update(kind: str):
        return lambda: train_step(state=state, loss_fn=losses[kind], x=x, y=None, lr=1e-5, runtime=runtime,
                                  params=params, grad_clip=1.0)

    wall, cpu = interleaved({k: update(k) for k in losses}, repeats=repeats, device=runtime.device)
    ratios = [d / t for t, d in zip(wall["teacher"], wall["distill"], strict=True)]
    cpu_ratios = [d / t for t, d in zip(cpu["teacher"], cpu["distill"], strict=True)]
    return {"workload": w, "device": device_name(runtime.device), "teacher_s": median(wall["teacher"]),
            "distill_s": median(wall["distill"]), "ratio": median(ratios), "ratios": ratios,
            "cpu_ratio": median(cpu_ratios), "cpu_ratios": cpu_ratios}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fmnist-cpu")
    p.add_argument("--batch", type=int, help="default: the preset's distill.batch_size")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine a 2-thread OpenMP team stalls whenever "
                        "another process holds a core, which swamps the ratio with noise)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    r = measure(args.preset, repeats=args.repeats, batch=args.batch, device=args.device)
    print(r["workload"].describe())
    print(f"teacher update {r['teacher_s'] * 1e3:.1f} ms, distillation update {r['distill_s'] * 1e3:.1f} ms (medians); "
          f"ratio median {r['ratio']:.3f} (per-repeat {min(r['ratios']):.3f}..{max(r['ratios']):.3f}); "
          f"target <= 1.75, floor ~1.67")
    spread = f"{min(r['cpu_ratios']):.3f}..{max(r['cpu_ratios']):.3f}"
    print(f"CPU-time ratio median {r['cpu_ratio']:.3f} (per-repeat {spread})")
    suffix = "" if args.preset == "fmnist-cpu" else f"_{args.preset.replace('-', '_')}"
    rows = [row(f"distill_over_teacher_step_ratio{suffix}", r["ratio"], "ratio", device=r["device"]),
            row(f"distill_over_teacher_step_ratio_cputime{suffix}", r["cpu_ratio"], "ratio", device=r["device"]),
            row(f"teacher_update_s{suffix}", r["teacher_s"], "s", device=r["device"]),
            row(f"distill_update_s{suffix}", r["distill_s"], "s", device=r["device"])]
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
