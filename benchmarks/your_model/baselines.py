"""Teacher baselines computed by diffusers itself, and the seed-to-seed spread of our own, over the pipeline's store.

``diffusers_ddim``: the teacher sampled by diffusers, ``DDIMPipeline``'s loop with the teacher's own
scheduler config as a ``DDIMScheduler`` with "trailing" spacing (``set_alpha_to_one``, ``clip_sample``
as saved: true), eta 0 and ``use_clipped_model_output=True`` (eps re-derived from the clipped x0, as
our sampler does). ``diffusers_ddim_default``: the same with ``DDIMPipeline``'s default
``use_clipped_model_output=None`` (x0 clipped, the model's own eps kept for the direction).
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


def diffusers_sampler(teacher_dir: Path, *, steps: int, clipped_eps: bool):
    """noise -> images with diffusers' own DDIM over the saved teacher (DDIMPipeline's loop)."""
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(str(teacher_dir), subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(str(teacher_dir), subfolder="scheduler", timestep_spacing="trailing")
    scheduler.set_timesteps(steps)

    def sample(noise: Tensor) -> Tensor:
        x = noise.clone()
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x, eta=0.0,
                                   use_clipped_model_output=True if clipped_eps else None).prev_sample
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
    """``diffusers_ddim`` and ``diffusers_ddim_default`` records per step count (cached)."""
    manifest = store.read_manifest(teacher_key)
    shape = tuple(load_model(store, teacher_key).image_shape)
    out = []
    for label, clipped_eps in (("diffusers_ddim", True), ("diffusers_ddim_default", False)):
        for n in steps:
            name = "diffusers-ddim-clipped-eps" if clipped_eps else "diffusers-ddim-default"
            key = f"{records_prefix(manifest['sha256'])}/{name}-{n:04d}-{eval_hash(cfg)}.json"

            def compute(n: int = n, label: str = label, clipped_eps: bool = clipped_eps) -> dict:
                fn = diffusers_sampler(teacher_dir, steps=n, clipped_eps=clipped_eps)
                metrics = _measure(cfg, ctx, fn, shape=shape, seed=cfg.eval.seed)
                return {"sampler": label, "steps": n, "gamma": None, **metrics, "model_sha256": manifest["sha256"]}

            out.append(_cached(store, key, compute))
            print(f"{label} {n:>3d} steps: {ctx.extractor.fd_name} {out[-1][ctx.extractor.fd_name]:.3f}", flush=True)
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
