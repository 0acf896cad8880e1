"""Teacher baselines computed by diffusers itself, and the seed-to-seed spread of our own, over the pipeline's store.

``diffusers_ddim``: the teacher as diffusers runs it, ``DDIMPipeline``'s loop with the teacher's own
scheduler config as a ``DDIMScheduler`` with "trailing" spacing (``set_alpha_to_one`` and
``clip_sample`` as configured, eta 0, the model's eps kept after clipping x0: diffusers' defaults).
``teacher_ddim_seed1``: our DDIM over the imported teacher with another noise seed (FD only), for the
sampling noise of one measurement. Both use the pipeline's feature network, reference and
evaluation settings (same N, same noise stream as every other record unless stated), and are cached
in the store under the teacher's weights sha256 like the pipeline's own records.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pd_core import evaluation
from pd_core.config import Config
from pd_core.evaluation import FeatureContext, eval_hash, records_prefix
from pd_core.metrics import evaluate_sampler
from pd_core.models import load_model
from pd_core.store import CheckpointStore


def diffusers_sampler(teacher_dir: Path, *, steps: int):
    """noise -> images with diffusers' own DDIM over the saved teacher (DDIMPipeline's loop)."""
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(str(teacher_dir), subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(str(teacher_dir), subfolder="scheduler", timestep_spacing="trailing")
    scheduler.set_timesteps(steps)

    def sample(noise: Tensor) -> Tensor:
        x = noise.clone()
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        return x

    return sample


def _cached(store: CheckpointStore, key: str, compute) -> dict:
    if store.exists(key):
        return json.loads(store.get_bytes(key))
    record = compute()
    store.put_bytes(key, json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def _measure(cfg: Config, ctx: FeatureContext, sample, *, shape: tuple[int, ...], seed: int) -> dict:
    ev = cfg.eval
    return evaluate_sampler(sample, num_samples=ev.num_samples, batch_size=ev.batch_size, seed=seed,
                            feature_extractor=ctx.extractor, reference_stats=ctx.reference.stats, image_shape=shape,
                            reference_features=ctx.reference.features, kid_subsets=ev.kid_subsets,
                            kid_subset_size=min(ev.kid_subset_size, ev.num_samples))


def diffusers_ddim_records(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *, teacher_key: str,
                           teacher_dir: Path, steps: list[int]) -> list[dict]:
    """One ``diffusers_ddim`` record per step count (cached)."""
    manifest = store.read_manifest(teacher_key)
    shape = tuple(load_model(store, teacher_key).image_shape)
    out = []
    for n in steps:
        key = f"{records_prefix(manifest['sha256'])}/diffusers-ddim-{n:04d}-{eval_hash(cfg)}.json"

        def compute(n: int = n) -> dict:
            metrics = _measure(cfg, ctx, diffusers_sampler(teacher_dir, steps=n), shape=shape, seed=cfg.eval.seed)
            return {"sampler": "diffusers_ddim", "steps": n, "gamma": None, **metrics,
                    "model_sha256": manifest["sha256"]}

        out.append(_cached(store, key, compute))
        print(f"diffusers_ddim {n:>3d} steps: {ctx.extractor.fd_name} {out[-1][ctx.extractor.fd_name]:.3f}", flush=True)
    return out


def seed_spread_records(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *, teacher_key: str,
                        steps: list[int], seed: int) -> list[dict]:
    """Our teacher DDIM with noise seed ``seed`` instead of eval.seed (cached): how much one FD moves with the noise."""
    manifest = store.read_manifest(teacher_key)
    model = load_model(store, teacher_key)
    out = []
    for n in steps:
        key = f"{records_prefix(manifest['sha256'])}/ddim-{n:04d}-noise-seed{seed}-{eval_hash(cfg)}.json"

        def compute(n: int = n) -> dict:
            fn = evaluation.make_sample_fn(model, sampler="ddim", steps=n, gamma=None, seed=seed,
                                           device=torch.device("cpu"))
            metrics = _measure(cfg, ctx, fn, shape=model.image_shape, seed=seed)
            return {"sampler": f"teacher_ddim_seed{seed}", "steps": n, "gamma": None, **metrics,
                    "model_sha256": manifest["sha256"]}

        out.append(_cached(store, key, compute))
    return out
