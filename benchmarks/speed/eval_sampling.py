"""Evaluation sampling on the CPU: batch size, fp32 against bf16 autocast, eager against torch.compile.

    python -m benchmarks.speed.eval_sampling                                  # fmnist-cpu U-Net, N=400, 8 steps
    python -m benchmarks.speed.eval_sampling --variants b200-fp32,b64-bf16 --repeats 3

One variant is ``b<batch>-<fp32|bf16>[-compile]``. Each samples the evaluation's N images in
batches of its size with the production sampling function (``pd_core.evaluation.make_sample_fn``:
DDIM under ``torch.inference_mode``, the network under autocast, optionally compiled) from the
evaluation's own noise (``sample_noise``), and is timed as a whole evaluation's sampling would be.
Variants run in turn within every repeat; seconds are medians, ratios are medians of the
per-repeat ratios against the first variant. A compiled variant pays its compilation on a warm-up
call; ``compile_s`` is that call minus a steady call, measured on a second model instance of the
same architecture (what every further checkpoint of a pipeline costs, in the same process).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.speed.common import device_name, interleaved, machine, median, row, write_rows
from benchmarks.speed.models import workload
from pd_core.denoiser import Denoiser
from pd_core.evaluation import make_sample_fn
from pd_core.metrics import sample_noise
from pd_core.models import LoadedModel
from pd_core.schedule import COSINE
from pd_core.unet import UNet

DEFAULT_VARIANTS = ("b200-fp32", "b64-fp32", "b200-bf16", "b64-bf16", "b64-bf16-compile")


def parse_variant(text: str) -> tuple[int, torch.dtype | None, bool]:
    """``b64-bf16-compile`` -> (64, torch.bfloat16, True)."""
    parts = text.split("-")
    if len(parts) not in (2, 3) or not parts[0].startswith("b") or parts[1] not in ("fp32", "bf16") or \
            (len(parts) == 3 and parts[2] != "compile"):
        raise SystemExit(f"error: --variants: {text!r} is not b<batch>-<fp32|bf16>[-compile], e.g. b64-bf16-compile")
    return int(parts[0][1:]), (torch.bfloat16 if parts[1] == "bf16" else None), len(parts) == 3


def _model(spec, parameterization: str, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    net = UNet(spec).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # non-zero output convs: a network that does something
    return LoadedModel(denoiser=Denoiser(net, parameterization=parameterization), manifest={}, steps=1,
                       schedule=COSINE)


def measure(preset: str, *, variants: list[str], num: int, steps: int, repeats: int) -> dict:
    w = workload(preset)
    shape = (w.spec.in_channels, w.spec.image_size, w.spec.image_size)
    models = [_model(w.spec, w.cfg.diffusion.parameterization, seed) for seed in (0, 1)]

    def evaluation(model: LoadedModel, variant: str):
        batch, dtype, compile_ = parse_variant(variant)
        fn = make_sample_fn(model, sampler="ddim", steps=steps, gamma=None, seed=0, device=torch.device("cpu"),
                            autocast_dtype=dtype, compile=compile_)
        noises = [sample_noise(seed=0, start=s, count=min(batch, num - s), shape=shape) for s in range(0, num, batch)]

        def run():
            for noise in noises:
                fn(noise)
        return run

    runs = {v: evaluation(models[0], v) for v in variants}
    compile_s, compile_cpu_s = {}, {}
    for v in variants:  # first call of each: compiles where asked, then one steady call of the same
        t0, c0 = time.perf_counter(), time.process_time()
        runs[v]()
        first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        runs[v]()
        compile_s[v] = first - (time.perf_counter() - t0)
        compile_cpu_s[v] = first_cpu - (time.process_time() - c0)
    fresh = {}
    for v in variants:
        if parse_variant(v)[2]:  # a second checkpoint of the same architecture: what it costs to compile again
            again = evaluation(models[1], v)
            t0 = time.perf_counter()
            again()
            fresh[v] = time.perf_counter() - t0
    wall, cpu = interleaved(runs, repeats=repeats, warmup=0)
    base = variants[0]
    ratios = {v: median([a / b for a, b in zip(wall[v], wall[base], strict=True)]) for v in variants}
    cpu_ratios = {v: median([a / b for a, b in zip(cpu[v], cpu[base], strict=True)]) for v in variants}
    return {"workload": w, "seconds": {v: median(wall[v]) for v in variants},
            "cpu_seconds": {v: median(cpu[v]) for v in variants}, "ratios": ratios, "cpu_ratios": cpu_ratios,
            "first_call_extra_s": compile_s,
            "first_call_extra_cpu_s": compile_cpu_s,
            "fresh_model_first_call_s": fresh}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fmnist-cpu")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--num", type=int, default=400, help="images per evaluation (the preset's eval.num_samples)")
    p.add_argument("--steps", type=int, default=8, help="DDIM steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings on a shared machine)")
    p.add_argument("--tag", default="", help="suffix of the result names (e.g. _malloc)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", help="also write the medians to this JSON file (for a parent benchmark)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; load average at start {os.getloadavg()[0]:.2f}")
    r = measure(args.preset, variants=variants, num=args.num, steps=args.steps, repeats=args.repeats)
    print(r["workload"].describe().rsplit(", batch", 1)[0] + f", N={args.num}, DDIM {args.steps} steps")
    for v in variants:
        s = r["seconds"][v]
        extra = (f"; first call +{r['first_call_extra_s'][v]:.1f} s wall, +{r['first_call_extra_cpu_s'][v]:.1f} s CPU"
                 if parse_variant(v)[2] else "")
        fresh = (f", a second model's first call {r['fresh_model_first_call_s'][v]:.1f} s"
                 if v in r["fresh_model_first_call_s"] else "")
        print(f"{v:20s} {s:7.2f} s wall ({r['cpu_seconds'][v]:.2f} s CPU), {s / (args.num * args.steps) * 1e3:.3f} "
              f"ms per image-step, x{r['ratios'][v]:.3f} of {variants[0]} wall, x{r['cpu_ratios'][v]:.3f} CPU"
              f"{extra}{fresh}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    suffix = ("" if args.preset == "fmnist-cpu" else f"_{args.preset.replace('-', '_')}") + args.tag
    dev = device_name("cpu")
    rows = []
    for v in variants:
        name = v.replace("-", "_")
        rows.append(row(f"eval_sampling_ms_per_image_step_{name}_{args.threads}t{suffix}",
                        r["seconds"][v] / (args.num * args.steps) * 1e3, "ms/(image x step), wall", device=dev))
        rows.append(row(f"eval_sampling_cpu_ms_per_image_step_{name}_{args.threads}t{suffix}",
                        r["cpu_seconds"][v] / (args.num * args.steps) * 1e3, "ms/(image x step), CPU", device=dev))
        if v != variants[0]:
            base = f"{variants[0].replace('-', '_')}_{args.threads}t{suffix}"
            rows.append(row(f"eval_sampling_{name}_over_{base}", r["ratios"][v], "ratio (wall)", device=dev))
            rows.append(row(f"eval_sampling_{name}_over_{base}_cputime", r["cpu_ratios"][v], "ratio (CPU time)",
                            device=dev))
        if parse_variant(v)[2]:
            rows.append(row(f"eval_sampling_{name}_first_call_extra_cpu_s_{args.threads}t{suffix}",
                            r["first_call_extra_cpu_s"][v], "s (CPU; compilation)", device=dev))
        if v in r["fresh_model_first_call_s"]:
            rows.append(row(f"eval_sampling_{name}_second_model_first_call_s_{args.threads}t{suffix}",
                            r["fresh_model_first_call_s"][v], "s", device=dev))
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"]}))
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
