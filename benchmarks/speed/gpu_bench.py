"""GPU benchmark: the paper's CIFAR-10 U-Net at batch 128 -- update throughput, MFU, 1-step sampling.

    python -m benchmarks.speed.gpu_bench              # on a CUDA machine; about 5-8 minutes; writes results.csv rows
    python -m benchmarks.speed.gpu_bench --no-compile # skip the torch.compile variants (about 1-2 minutes)
    python -m benchmarks.speed.gpu_bench --dry-run    # CPU, tiny U-Net, a few steps: checks the script (seconds)

What it measures (device column = the GPU's name):
- ``bf16_matmul_peak_tflops``: the measured peak, a large bf16 matmul (the MFU denominator);
- per configuration fp32 / bf16 / bf16+compile (bf16 = autocast bf16 + channels_last + fused AdamW,
  the production Runtime on CUDA): images/s of a teacher update and of a distillation update,
  alternated in blocks (the ratio is side by side), and ``mfu_*`` = model FLOPs per second / peak,
  where model FLOPs are counted by ``torch.utils.flop_counter`` on one forward (+ backward) of the
  network: teacher update = fwd + bwd, distillation update = 2 teacher fwd + student fwd + bwd;
- ``mfu``: the distillation update's MFU with bf16+compile (or bf16 without compile);
- ``sampling_1step_images_per_s_*``: one-step DDIM (inference mode, bf16 autocast) eager and with
  ``samplers.compiled`` (torch.compile mode="reduce-overhead": a CUDA graph), at the training batch
  and at batch 1024.

Every update is the production code: ``pd_core.train.train_step`` with ``teacher_loss_fn`` /
``distill_loss_fn`` on a Runtime from ``resolve_runtime``, data resident on the device, no host sync
inside a timed block. A time budget (``--budget-s``, default 540 s) skips what would not finish.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from types import SimpleNamespace

import torch

from pd_core import samplers
from pd_core.denoiser import Denoiser
from pd_core.schedule import COSINE
from pd_core.train import (
    TrainState,
    distill_loss_fn,
    make_optimizer,
    prepare_module,
    resolve_runtime,
    teacher_loss_fn,
    train_step,
)
from pd_core.unet import UNet, UNetSpec, paper_cifar10_spec

DIFFUSION = SimpleNamespace(parameterization="x", weighting="snr_trunc", logsnr_min=-20.0, logsnr_max=20.0)
TINY = UNetSpec(in_channels=3, out_channels=3, image_size=8, ch=16, emb_ch=64, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0, norm_groups=8)  # dry run: every code path, in seconds


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, *, n: int, iters: int) -> float:
    """Measured bf16 matmul throughput (TFLOP/s) of an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def model_flops(spec: UNetSpec, *, batch: int, device: torch.device) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of the U-Net on one batch, counted op by op (fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(spec).to(device)
    z = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, device=device)
    lam = torch.zeros(batch, device=device)
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            net(z, lam)
    with FlopCounterMode(display=False) as both:
        net(z, lam).square().mean().backward()
    return float(fwd.get_total_flops()), float(both.get_total_flops())


def runtime_for(config: str, *, device: str):
    precision = "fp32" if config == "fp32" else "bf16"
    cfg = SimpleNamespace(device=device, precision=precision, channels_last=None if device == "cuda" else False,
                          compile=config.endswith("compile"), threads=None)
    return resolve_runtime(cfg)


def bench_updates(spec: UNetSpec, *, config: str, device: str, batch: int, steps: int, blocks: int,
                  warmup: int = 3) -> dict:
    """images/s of teacher and distillation updates, alternated in ``blocks`` blocks of ``steps`` updates."""
    runtime = runtime_for(config, device=device)
    torch.manual_seed(0)
    student = prepare_module(UNet(spec), runtime)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    teacher_net = torch.compile(teacher) if runtime.compile else teacher
    net = torch.compile(student) if runtime.compile else student
    state = TrainState(model=student, optimizer=make_optimizer(student, lr=1e-5, weight_decay=0.0, runtime=runtime),
                       ema=None, step=0, noise_generator=torch.Generator(device=runtime.device).manual_seed(0))
    params = list(student.parameters())
    x = torch.rand(batch, spec.in_channels, spec.image_size, spec.image_size, device=runtime.device) * 2 - 1
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    losses = {"teacher": teacher_loss_fn(net=net, diffusion_cfg=DIFFUSION, generator=state.noise_generator),
              "distill": distill_loss_fn(net=net, teacher_net=teacher_net, student_steps=4, diffusion_cfg=DIFFUSION,
                                         generator=state.noise_generator, schedule=COSINE)}

    def block(kind: str, n: int) -> float:
        sync(runtime.device)
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(state=state, loss_fn=losses[kind], x=x, y=None, lr=1e-5, runtime=runtime, params=params,
                       grad_clip=1.0)
        sync(runtime.device)
        return time.perf_counter() - t0

    t_warm = time.perf_counter()
    for kind in losses:  # warm-up (compiles here)
        block(kind, warmup)
    warmup_s = time.perf_counter() - t_warm
    times = {"teacher": [], "distill": []}
    for _ in range(blocks):
        for kind in losses:
            times[kind].append(block(kind, steps) / steps)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ratios = sorted(d / t for t, d in zip(times["teacher"], times["distill"], strict=True))
    return {"teacher_s": med["teacher"], "distill_s": med["distill"], "ratio": ratios[len(ratios) // 2],
            "warmup_s": warmup_s}


def bench_sampling(spec: UNetSpec, *, device: str, batch: int, compiled: bool, iters: int) -> float:
    """images/s of 1-step DDIM (inference mode; bf16 autocast on CUDA; optionally a compiled CUDA graph)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    net = UNet(dataclasses.replace(spec, dropout=0.0)).to(dev).eval().requires_grad_(False)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    denoiser = Denoiser(net, parameterization="x")
    fn = samplers.compiled(denoiser) if compiled else denoiser
    z = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, device=dev)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def run():
        with torch.inference_mode(), autocast:
            return samplers.ddim(fn, z, num_steps=1)

    for _ in range(3):
        run()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    sync(dev)
    return batch * iters / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny U-Net, few steps, nothing written")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="updates per timed block")
    p.add_argument("--blocks", type=int, default=3, help="alternating teacher/distillation blocks per config")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new measurements after this")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)
    if args.dry_run:
        torch.set_num_threads(1)
        device, spec, batch, steps, blocks, warmup = "cpu", TINY, 8, 2, 2, 1
        configs = ["fp32", "bf16"] + ([] if args.no_compile else [])  # compile on CPU needs a C++ toolchain: skipped
        peak_n, peak_iters, sample_batches, sample_iters = 256, 3, [8], 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check the script on a CPU")
        device, spec, batch, steps, blocks, warmup = ("cuda", paper_cifar10_spec(dropout=0.0), args.batch, args.steps,
                                                      args.blocks, 3)
        configs = ["fp32", "bf16"] + ([] if args.no_compile else ["bf16+compile"])
        peak_n, peak_iters, sample_batches, sample_iters = 8192, 50, [args.batch, 1024], 20
        torch.backends.cudnn.benchmark = True
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    params = sum(p.numel() for p in UNet(spec).parameters())
    print(f"device {name}; U-Net ch {spec.ch} mult {list(spec.ch_mult)} x{spec.num_res_blocks} attn "
          f"{list(spec.attn_resolutions)}: {params / 1e6:.1f}M params; "
          f"batch {batch} of {spec.image_size}x{spec.image_size}")
    peak = matmul_peak_tflops(dev, n=peak_n, iters=peak_iters)
    fwd, fwd_bwd = model_flops(spec, batch=batch, device=dev)
    print(f"bf16 matmul peak {peak:.1f} TFLOP/s; model FLOPs per batch: forward {fwd / 1e12:.3f} T, "
          f"forward+backward {fwd_bwd / 1e12:.3f} T")
    flops = {"teacher": fwd_bwd, "distill": 2 * fwd + fwd_bwd}
    rows: list[tuple[str, float, str]] = [("bf16_matmul_peak_tflops", peak, "TFLOP/s")]
    mfu_distill: dict[str, float] = {}
    for config in configs:
        if budget.left() < 90:
            print(f"{config}: skipped (time budget)")
            continue
        r = bench_updates(spec, config=config, device=device, batch=batch, steps=steps, blocks=blocks, warmup=warmup)
        tag = config.replace("+", "_")
        for kind in ("teacher", "distill"):
            ips = batch / r[f"{kind}_s"]
            mfu = flops[kind] / r[f"{kind}_s"] / (peak * 1e12)
            rows += [(f"gpu_{kind}_update_images_per_s_{tag}", ips, "images/s"), (f"mfu_{kind}_{tag}", mfu, "fraction")]
            if kind == "distill":
                mfu_distill[config] = mfu
            print(f"{config:13s} {kind:8s} update {r[f'{kind}_s'] * 1e3:8.2f} ms  {ips:9.1f} images/s  MFU {mfu:.1%}")
        rows.append((f"distill_over_teacher_step_ratio_{tag}", r["ratio"], "ratio"))
        print(f"{config:13s} distillation / teacher update {r['ratio']:.3f} "
              f"(warm-up incl. compile {r['warmup_s']:.0f} s)")
    best = "bf16+compile" if "bf16+compile" in mfu_distill else "bf16"
    if best in mfu_distill:
        rows.append(("mfu", mfu_distill[best], f"fraction (distillation update, {best})"))
    for b in sample_batches:
        for compiled in ([False] if args.dry_run or args.no_compile else [False, True]):
            if budget.left() < 60:
                print(f"sampling batch {b} compiled={compiled}: skipped (time budget)")
                continue
            ips = bench_sampling(spec, device=device, batch=b, compiled=compiled, iters=sample_iters)
            tag = f"b{b}_{'cudagraph' if compiled else 'eager'}"
            rows.append((f"sampling_1step_images_per_s_{tag}", ips, "images/s (bf16)"))
            mode = "compiled (CUDA graph)" if compiled else "eager"
            print(f"1-step sampling batch {b:5d} {mode:22s} {ips:10.1f} images/s")
    print(f"total {time.perf_counter() - budget.start:.0f} s")
    if args.dry_run:
        print("dry run: nothing written")
        return
    from benchmarks.speed.common import row, write_rows

    write_rows([row(b, v, u, device=name) for b, v, u in rows])


if __name__ == "__main__":
    main()
