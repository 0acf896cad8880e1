"""Clipped vs unclipped DDIM sampling of students distilled from a diffusers teacher, at CPU size.

    python -m benchmarks.clipping.reproduce [--work runs/clipping] [--teacher-updates 1500]

1. A tiny ``UNet2DModel`` (16 and 32 channels, batch 64) trained on scikit-learn's 8x8 digits with diffusers'
   recipe (``DDPMScheduler`` linear betas, T = 1000, epsilon, MSE on the noise), saved with
   ``save_pretrained``.
2. Imported and distilled 8 -> 4 -> 2 -> 1 through ``pd_core.jobs`` (smoke preset, ``--round-updates``
   per round).
3. Each checkpoint sampled by DDIM at its own N three ways: ``x_clip_eps_kept`` (x_hat clipped, the
   model's eps kept: the stock ``DDIMPipeline`` with ``clip_sample=True``, what exports use),
   ``unclipped`` and ``x_clip_eps_rederived`` (eps from the clipped x_hat); FD in the smoke preset's
   digits-classifier feature space (not Inception FID), ``--samples`` samples vs the test split, the same
   noise for every mode. Writes ``results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from pd_core import evaluation, jobs, samplers
from pd_core.config import load_config
from pd_core.data import load_split
from pd_core.metrics import evaluate_sampler
from pd_core.models import load_model
from pd_core.store import CheckpointStore

MODES = {"x_clip_eps_kept": {"clip": True, "keep_eps": True}, "unclipped": {"clip": False},
         "x_clip_eps_rederived": {"clip": True, "keep_eps": False}}


def train_teacher(out: Path, *, updates: int, seed: int = 0) -> float:
    """diffusers' DDPM recipe on 8x8 digits; returns the last 100 updates' mean loss."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    cfg = load_config(preset="smoke")
    x = torch.as_tensor(load_split(cfg.data, split="train").images)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-6)
    losses = []
    for u in range(updates):
        batch = x[torch.randint(0, len(x), (64,))]
        noise = torch.randn_like(batch)
        k = torch.randint(0, 1000, (len(batch),))
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(batch, noise, k), k).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * (u + 1) / updates))
        losses.append(float(loss.detach()))
        if u % 250 == 0:
            print(f"teacher update {u}/{updates}: loss {loss:.4f}", flush=True)
    DDPMPipeline(unet=unet.eval(), scheduler=sched).save_pretrained(str(out))
    return sum(losses[-100:]) / 100


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/clipping")
    parser.add_argument("--teacher-updates", type=int, default=1500)
    parser.add_argument("--round-updates", type=int, default=150)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args(argv)
    work = Path(args.work)
    t0 = time.time()
    torch.set_num_threads(1)
    teacher_loss = None
    if not (work / "teacher" / "unet").is_dir():
        teacher_loss = train_teacher(work / "teacher", updates=args.teacher_updates)
    cfg = load_config(preset="smoke", overrides=[
        f"pipeline.teacher_uri=diffusers:{work / 'teacher'}", f"storage.root={work / 'store'}", "pipeline.name=clip",
        "distill.start_steps=8", f"distill.updates_per_round={args.round_updates}", f"eval.num_samples={args.samples}",
        "eval.kid_subset_size=100"])
    store = CheckpointStore(cfg.storage.root)
    infos = [jobs.ensure_teacher(cfg, store)]
    for i, _ in enumerate(cfg.distill.rounds(), start=1):
        infos.append(jobs.run_round(cfg, store, round_index=i, teacher=infos[-1]))
    ctx = evaluation.feature_context(cfg, store)
    rows = []
    for info in infos:
        model = load_model(store, info.key)
        denoiser = evaluation.sampling_denoiser(model, autocast_dtype=None, compile=False)
        for mode, kw in MODES.items():
            def sample(noise, model=model, kw=kw, n=info.steps, denoiser=denoiser):
                with torch.inference_mode():
                    return samplers.ddim(denoiser, noise, num_steps=n, schedule=model.schedule, **kw)

            m = evaluate_sampler(sample, num_samples=cfg.eval.num_samples, batch_size=250, seed=cfg.eval.seed,
                                 feature_extractor=ctx.extractor, reference_stats=ctx.reference.stats,
                                 image_shape=model.image_shape, reference_features=ctx.reference.features,
                                 kid_subsets=20, kid_subset_size=100)
            rows.append({"model": "teacher" if info.steps == 8 else "student", "steps": info.steps, "mode": mode,
                         **{k: float(v) for k, v in m.items() if isinstance(v, (int, float))}})
            fd = rows[-1][ctx.extractor.fd_name]
            print(f"{rows[-1]['model']} N={info.steps} {mode}: {ctx.extractor.fd_name} {fd:.3f}", flush=True)
    floor = evaluation.floor_record(cfg, store, ctx)
    out = {"command": "python -m benchmarks.clipping.reproduce " + " ".join(sys.argv[1:]), "args": vars(args),
           "fd_name": ctx.extractor.fd_name, "floor": floor.get(ctx.extractor.fd_name), "rows": rows,
           "teacher_last_loss": teacher_loss, "seconds": round(time.time() - t0, 1),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), shared 2-core CPU"}
    (work / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["rows"]))


if __name__ == "__main__":
    main()
