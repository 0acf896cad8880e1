"""GPU benchmark: the paper's CIFAR-10 U-Net at batch 128 -- update throughput, MFU, 1- and 4-step sampling.

    python -m benchmarks.speed.gpu_bench              # on a CUDA machine; writes results.csv rows
    python -m benchmarks.speed.gpu_bench --no-compile # skip the torch.compile variants
    python -m benchmarks.speed.gpu_bench --dry-run    # CPU, tiny U-Net, a few steps: checks the script

``benchmarks.gpu.run`` calls :func:`measure` as the first part of the prepared GPU run.

What it measures (device column = the GPU's name):
- ``bf16_matmul_peak_tflops``: the measured peak, a large bf16 matmul (the MFU denominator);
- per configuration fp32 / bf16 / bf16+compile (bf16 = autocast bf16 + channels_last + fused AdamW,
  the production Runtime on CUDA): images/s of a teacher update and of a distillation update,
  alternated in blocks (the ratio is side by side), and ``mfu_*`` = model FLOPs per second / peak,
  where model FLOPs are counted by ``torch.utils.flop_counter`` on one forward (+ backward) of the
  network: teacher update = fwd + bwd, distillation update = 2 teacher fwd + student fwd + bwd;
- ``mfu_teacher`` / ``mfu``: the teacher / distillation update's MFU, the best of bf16 and bf16+compile;
- ``sampling_{1,4}step_images_per_s_*``: N-step DDIM (inference mode, bf16 autocast) eager and with
  ``samplers.compiled`` (torch.compile mode="reduce-overhead": a CUDA graph), at the training batch
  and at batch 1024.

Every update is the production code: ``pd_core.train.train_step`` with ``teacher_loss_fn`` /
``distill_loss_fn`` on a Runtime from ``resolve_runtime``, data resident on the device, no host sync
inside a timed block. A time budget skips a measurement when less time is left than it needs
(``SpeedPlan.need_s``); the cheap ones run first, the compiled ones last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd_core import samplers
from pd_core.config import DiffusionConfig, RuntimeConfig
from pd_core.denoiser import Denoiser
from pd_core.schedule import COSINE
from pd_core.train import (
    Runtime,
    TrainState,
    distill_loss_fn,
    make_optimizer,
    prepare_module,
    resolve_runtime,
    teacher_loss_fn,
    train_step,
)
from pd_core.unet import UNet, UNetSpec, paper_cifar10_spec

DIFFUSION = DiffusionConfig(parameterization="x", weighting="snr_trunc")
TINY = UNetSpec(in_channels=3, out_channels=3, image_size=8, ch=16, emb_ch=64, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0, norm_groups=8)  # dry run: every code path, in seconds
KINDS = ("teacher", "distill")
Row = tuple[str, float, str]  # (benchmark, value, unit)


class Budget:
    """Seconds left of a time budget that started at construction."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass(frozen=True)
class SpeedPlan:
    """What :func:`measure` runs: network, batch, timing blocks, configurations and sampling variants."""

    spec: UNetSpec
    device: str  # "cuda" or "cpu"
    batch: int  # training batch (teacher and distillation updates)
    steps: int  # updates per timed block
    blocks: int  # alternating teacher/distillation blocks per configuration
    warmup: int  # updates of each kind before timing (compilation happens here)
    configs: tuple[str, ...]  # of "fp32", "bf16", "bf16+compile"
    peak_n: int  # the bf16 matmul is peak_n x peak_n x peak_n
    peak_iters: int
    sample_batches: tuple[int, ...]
    sample_steps: tuple[int, ...]  # DDIM step counts timed per batch
    sample_iters: int
    sample_compiled: bool  # also time samplers.compiled (a CUDA graph on CUDA)
    need_s: dict[str, float]  # seconds a measurement needs: "update", "compile", "sample", "sample_compiled"


def gpu_plan(*, batch: int = 128, steps: int = 10, blocks: int = 3, compile: bool = True) -> SpeedPlan:
    """The paper's CIFAR-10 U-Net (dropout 0) on CUDA at ``batch``; the time each measurement needs is an estimate."""
    return SpeedPlan(spec=paper_cifar10_spec(dropout=0.0), device="cuda", batch=batch, steps=steps, blocks=blocks,
                     warmup=3, configs=("fp32", "bf16") + (("bf16+compile",) if compile else ()),
                     peak_n=8192, peak_iters=50, sample_batches=(batch, 1024), sample_steps=(1, 4), sample_iters=20,
                     sample_compiled=compile,
                     need_s={"update": 30.0, "compile": 90.0, "sample": 20.0, "sample_compiled": 45.0})


def dry_run_plan() -> SpeedPlan:
    """Every code path on the CPU in seconds: the tiny U-Net, a few updates, no compile (it needs a C++ toolchain)."""
    return SpeedPlan(spec=TINY, device="cpu", batch=8, steps=2, blocks=2, warmup=1, configs=("fp32", "bf16"),
                     peak_n=256, peak_iters=3, sample_batches=(8,), sample_steps=(1, 4), sample_iters=2,
                     sample_compiled=False, need_s={"update": 1.0, "compile": 1.0, "sample": 1.0,
                                                    "sample_compiled": 1.0})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, *, n: int, iters: int) -> float:
    """Measured bf16 matmul throughput (TFLOP/s) of an n x n x n product (random operands, never zeros)."""
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


def runtime_for(config: str, *, device: str) -> Runtime:
    """The production Runtime of a configuration: fp32, bf16 (autocast, channels_last on CUDA) or bf16+compile."""
    cfg = RuntimeConfig(device=device, precision="fp32" if config == "fp32" else "bf16",
                        channels_last=None if device == "cuda" else False, compile=config.endswith("compile"))
    return resolve_runtime(cfg)


def bench_updates(spec: UNetSpec, *, runtime: Runtime, batch: int, steps: int, blocks: int, warmup: int = 3,
                  kinds: tuple[str, ...] = KINDS, diffusion: DiffusionConfig = DIFFUSION) -> dict[str, float]:
    """Seconds per update of each of ``kinds`` (``<kind>_s``, medians over ``blocks`` alternated blocks of ``steps``),
    ``ratio`` (distillation / teacher, the median of the per-block ratios, when both are timed) and ``warmup_s``."""
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
    makers: dict[str, Callable] = {
        "teacher": lambda: teacher_loss_fn(net=net, diffusion_cfg=diffusion, generator=state.noise_generator),
        "distill": lambda: distill_loss_fn(net=net, teacher_net=teacher_net, student_steps=4, diffusion_cfg=diffusion,
                                           generator=state.noise_generator, schedule=COSINE)}
    losses = {kind: makers[kind]() for kind in kinds}

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
    out = {"warmup_s": time.perf_counter() - t_warm}
    times: dict[str, list[float]] = {kind: [] for kind in losses}
    for _ in range(blocks):
        for kind in losses:
            times[kind].append(block(kind, steps) / steps)
    for kind, values in times.items():
        out[f"{kind}_s"] = sorted(values)[len(values) // 2]
    if "teacher" in times and "distill" in times:
        ratios = sorted(d / t for t, d in zip(times["teacher"], times["distill"], strict=True))
        out["ratio"] = ratios[len(ratios) // 2]
    return out


def bench_sampling(spec: UNetSpec, *, device: str, batch: int, step_counts: tuple[int, ...], compiled: bool,
                   iters: int, autocast: bool = True) -> dict[int, float]:
    """images/s of N-step DDIM for each N of ``step_counts`` (inference mode; bf16 autocast unless ``autocast`` is
    False; with ``compiled`` one ``samplers.compiled`` denoiser, a CUDA graph on CUDA, serves every N)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    net = UNet(dataclasses.replace(spec, dropout=0.0)).to(dev).eval().requires_grad_(False)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    denoiser = Denoiser(net, parameterization="x")
    fn = samplers.compiled(denoiser) if compiled else denoiser
    z = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, device=dev)
    out = {}
    for n in step_counts:
        def run(n: int = n) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                return samplers.ddim(fn, z, num_steps=n)

        for _ in range(3):
            run()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        sync(dev)
        out[n] = batch * iters / (time.perf_counter() - t0)
    return out


def _skip(what: str, *, need: float, budget: Budget, echo: Callable[[str], None]) -> bool:
    if budget.left() >= need:
        return False
    echo(f"{what}: skipped (time budget: {max(budget.left(), 0):.0f} s left, it needs ~{need:.0f} s)")
    return True


def _updates(plan: SpeedPlan, config: str, *, flops: dict[str, float], peak: float, rows: list[Row],
             mfu: dict[str, dict[str, float]], echo: Callable[[str], None]) -> None:
    r = bench_updates(plan.spec, runtime=runtime_for(config, device=plan.device), batch=plan.batch, steps=plan.steps,
                      blocks=plan.blocks, warmup=plan.warmup)
    tag = config.replace("+", "_")
    for kind in KINDS:
        ips = plan.batch / r[f"{kind}_s"]
        mfu[kind][config] = flops[kind] / r[f"{kind}_s"] / (peak * 1e12)
        rows += [(f"gpu_{kind}_update_images_per_s_{tag}", ips, "images/s"),
                 (f"mfu_{kind}_{tag}", mfu[kind][config], "fraction")]
        echo(f"{config:13s} {kind:8s} update {r[f'{kind}_s'] * 1e3:8.2f} ms  {ips:9.1f} images/s  "
             f"MFU {mfu[kind][config]:.1%}")
    rows.append((f"distill_over_teacher_step_ratio_{tag}", r["ratio"], "ratio"))
    echo(f"{config:13s} distillation / teacher update {r['ratio']:.3f} (warm-up incl. compile {r['warmup_s']:.0f} s)")


def _sampling(plan: SpeedPlan, batch: int, *, compiled: bool, rows: list[Row], echo: Callable[[str], None]) -> None:
    ips = bench_sampling(plan.spec, device=plan.device, batch=batch, step_counts=plan.sample_steps, compiled=compiled,
                         iters=plan.sample_iters)
    tag, mode = ("cudagraph", "compiled (CUDA graph)") if compiled else ("eager", "eager")
    for n, value in ips.items():
        rows.append((f"sampling_{n}step_images_per_s_b{batch}_{tag}", value, "images/s (bf16)"))
        echo(f"{n}-step sampling batch {batch:5d} {mode:22s} {value:10.1f} images/s")


def measure(plan: SpeedPlan, *, budget: Budget, echo: Callable[[str], None] = print) -> list[Row]:
    """Every measurement of ``plan`` that fits in ``budget``, cheapest first; the rows of results.csv (no device)."""
    dev = torch.device(plan.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
    spec = plan.spec
    params = sum(p.numel() for p in UNet(spec).parameters())
    echo(f"U-Net ch {spec.ch} mult {list(spec.ch_mult)} x{spec.num_res_blocks} attn {list(spec.attn_resolutions)}: "
         f"{params / 1e6:.1f}M params; batch {plan.batch} of {spec.image_size}x{spec.image_size}")
    peak = matmul_peak_tflops(dev, n=plan.peak_n, iters=plan.peak_iters)
    fwd, fwd_bwd = model_flops(spec, batch=plan.batch, device=dev)
    echo(f"bf16 matmul peak {peak:.1f} TFLOP/s; model FLOPs per batch: forward {fwd / 1e12:.3f} T, "
         f"forward+backward {fwd_bwd / 1e12:.3f} T")
    flops = {"teacher": fwd_bwd, "distill": 2 * fwd + fwd_bwd}
    rows: list[Row] = [("bf16_matmul_peak_tflops", peak, "TFLOP/s")]
    mfu: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
    eager = [c for c in plan.configs if not c.endswith("compile")]
    for config in eager:
        if not _skip(config, need=plan.need_s["update"], budget=budget, echo=echo):
            _updates(plan, config, flops=flops, peak=peak, rows=rows, mfu=mfu, echo=echo)
    for batch in plan.sample_batches:
        if not _skip(f"sampling batch {batch} eager", need=plan.need_s["sample"], budget=budget, echo=echo):
            _sampling(plan, batch, compiled=False, rows=rows, echo=echo)
    for config in [c for c in plan.configs if c not in eager]:
        if not _skip(config, need=plan.need_s["compile"], budget=budget, echo=echo):
            _updates(plan, config, flops=flops, peak=peak, rows=rows, mfu=mfu, echo=echo)
    for batch in plan.sample_batches if plan.sample_compiled else ():
        if not _skip(f"sampling batch {batch} compiled", need=plan.need_s["sample_compiled"], budget=budget,
                     echo=echo):
            _sampling(plan, batch, compiled=True, rows=rows, echo=echo)
    for kind, name in (("teacher", "mfu_teacher"), ("distill", "mfu")):
        best = max((c for c in ("bf16", "bf16+compile") if c in mfu[kind]), key=lambda c: mfu[kind][c], default=None)
        if best is not None:
            label = "teacher update" if kind == "teacher" else "distillation update"
            rows.append((name, mfu[kind][best], f"fraction ({label}, {best})"))
    echo(f"speed measurements took {budget.elapsed():.0f} s")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny U-Net, few steps, nothing written")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="updates per timed block")
    p.add_argument("--blocks", type=int, default=3, help="alternating teacher/distillation blocks per config")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip measurements that would not fit in this")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)
    if args.dry_run:
        torch.set_num_threads(1)
        plan, name = dry_run_plan(), "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check the script on a CPU")
        plan = gpu_plan(batch=args.batch, steps=args.steps, blocks=args.blocks, compile=not args.no_compile)
        name = torch.cuda.get_device_name(torch.device("cuda"))
    print(f"device {name}")
    rows = measure(plan, budget=budget)
    if args.dry_run:
        print("dry run: nothing written")
        return
    from benchmarks.speed.common import row, write_rows

    write_rows([row(b, v, u, device=name) for b, v, u in rows])


if __name__ == "__main__":
    main()
