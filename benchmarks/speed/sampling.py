"""Per-step overhead of the samplers, and seconds per image at 1, 4 and 64 steps.

    python -m benchmarks.speed.sampling                       # smoke U-Net (the CI pipeline's), batch 200
    python -m benchmarks.speed.sampling --preset fmnist-cpu --batch 64 --repeats 3

sampling_overhead_ratio_nN = time(N-step DDIM) / (N x time(1-step DDIM)) at a fixed batch, the
calls interleaved within every repeat, medians. 1.0 means a step costs exactly one network call:
the schedule is computed once per call (not per step), nothing syncs with the host. An N-step
call also does N - 1 DDIM updates (a few elementwise ops on the batch) that the 1-step call does
not, so a small model shows them; the target is <= 1.05. Sampling runs as evaluation runs it:
``torch.inference_mode`` around ``samplers.ddim`` over an eval-mode network.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.speed.common import device_name, interleaved, machine, median, row, write_rows
from benchmarks.speed.models import workload
from pd_core import samplers
from pd_core.denoiser import Denoiser
from pd_core.unet import UNet

STEPS = (1, 4, 64)


def measure(preset: str, *, batch: int, repeats: int, device: str = "cpu", steps=STEPS) -> dict:
    w = workload(preset, batch=batch)
    torch.manual_seed(0)
    net = UNet(w.spec).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # non-zero output convs: a network that does something
    denoiser = Denoiser(net, parameterization=w.cfg.diffusion.parameterization)
    z = torch.randn(batch, w.spec.in_channels, w.spec.image_size, w.spec.image_size,
                    generator=torch.Generator().manual_seed(1)).to(device)

    longest = max(steps)
    calls = {n: max(1, longest // (4 * n)) for n in steps}  # a few calls of the short samplers per timing

    def sample(n: int):
        def run():
            with torch.inference_mode():
                for _ in range(calls[n]):
                    samplers.ddim(denoiser, z, num_steps=n)
        return run

    wall, cpu = interleaved({n: sample(n) for n in steps}, repeats=repeats, warmup=1, device=device)
    per_call = {n: [t / calls[n] for t in wall[n]] for n in steps}
    cpu_call = {n: [t / calls[n] for t in cpu[n]] for n in steps}
    return {"workload": w, "device": device_name(device), "batch": batch,
            "seconds": {n: median(per_call[n]) for n in steps},
            "ratio": {n: median(per_call[n]) / (n * median(per_call[1])) for n in steps if n > 1},
            "cpu_ratio": {n: median(cpu_call[n]) / (n * median(cpu_call[1])) for n in steps if n > 1}}


def null_overhead_us(*, batch: int = 200, steps: int = 64, repeats: int = 20) -> float:
    """Non-network time per DDIM step (us): the sampler over a denoiser that only applies the parameterization."""
    from pd_core.parameterization import to_x_eps

    z = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def null(zz, lam):
        return to_x_eps(0.5 * zz, z=zz, logsnr=lam, kind="x")

    def run():
        with torch.inference_mode():
            samplers.ddim(null, z, num_steps=steps)

    _, cpu = interleaved({"null": run}, repeats=repeats)
    return median(cpu["null"]) / steps * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smoke")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings on a shared machine)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    r = measure(args.preset, batch=args.batch, repeats=args.repeats, device=args.device)
    print(r["workload"].describe().replace(f"batch {r['workload'].batch}", f"batch {args.batch}"))
    for n, s in r["seconds"].items():
        print(f"{n:3d} steps: {s:.4f} s per batch, {s / args.batch * 1e3:.3f} ms per image")
    for n in r["ratio"]:
        print(f"time({n}) / ({n} x time(1)) = {r['ratio'][n]:.3f} wall, {r['cpu_ratio'][n]:.3f} CPU time "
              f"(target <= 1.05)")
    null_us = null_overhead_us()
    print(f"sampler overhead without a network: {null_us:.0f} us per step (parameterization, clip, DDIM update)")
    suffix = "" if args.preset == "smoke" else f"_{args.preset.replace('-', '_')}"
    dev = r["device"]
    rows = [row(f"sampling_overhead_ratio{suffix}", max(r["ratio"].values()), "ratio (worst of N=4, 64)", device=dev)]
    rows += [row(f"sampling_overhead_ratio_n{n}{suffix}", v, "ratio", device=dev) for n, v in r["ratio"].items()]
    rows += [row(f"sampling_s_per_image_{n}step{suffix}", s / args.batch, "s/image", device=dev)
             for n, s in r["seconds"].items()]
    rows.append(row("sampler_overhead_us_per_step_null_network", null_us, "us/step", device="cpu"))
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
