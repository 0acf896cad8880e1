"""Teacher baselines computed by diffusers itself, and the seed-to-seed spread of our own, over the pipeline's store.

``diffusers_ddim``: the teacher sampled as ``DDIMPipeline.from_pretrained(teacher folder)`` does with
its default call arguments (:func:`pd_core.interop.diffusers_ddim.folder_ddim`: the folder's own
``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample``, ``thresholding``; x0
clipped, the model's eps kept), on the same noise as every other record. Our own DDIM over the
imported teacher (trailing integer timesteps, x_hat clipped, eps re-derived) is ``teacher_ddim``.
``teacher_ddim_seed1``: our DDIM over the imported teacher with another noise seed (FD only), for the
sampling noise of one measurement. ``distilled_unclipped`` and ``distilled_eps_from_clipped_x``: each
distilled student at its own N sampled without clipping, and with x_hat clipped and eps re-derived
from it, beside ``distilled`` (x_hat clipped, the model's eps kept: what the stock ``DDIMPipeline``
does with an export's ``clip_sample=True``): the clipped-vs-unclipped measurement behind that choice.
All use the pipeline's feature network, reference and
evaluation settings, and are cached in the store under the teacher's weights sha256 like the
pipeline's own records.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pd_core import evaluation, samplers
from pd_core.config import Config
from pd_core.evaluation import FeatureContext, eval_hash, records_prefix
from pd_core.interop.diffusers_ddim import folder_ddim
from pd_core.interop.diffusers_folder import read_configs
from pd_core.metrics import evaluate_sampler
from pd_core.models import load_model
from pd_core.store import CheckpointStore


def diffusers_sampler(teacher_dir: Path, *, steps: int):
    """noise -> images with ``DDIMPipeline.from_pretrained(teacher_dir)``'s loop and default call arguments."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(teacher_dir), subfolder="unet").eval()
    scheduler_config = read_configs(str(teacher_dir)).scheduler_config

    def sample(noise: Tensor) -> Tensor:
        with torch.inference_mode():
            return folder_ddim(unet, scheduler_config, noise, steps=steps)

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
    """``diffusers_ddim`` records per step count (cached)."""
    manifest = store.read_manifest(teacher_key)
    shape = tuple(load_model(store, teacher_key).image_shape)
    out = []
    for n in steps:
        key = f"{records_prefix(manifest['sha256'])}/diffusers-ddim-pipeline-{n:04d}-{eval_hash(cfg)}.json"

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


CLIP_MODES = {"distilled_unclipped": {"clip": False}, "distilled_eps_from_clipped_x": {"clip": True, "keep_eps": False}}


def clip_study_records(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *,
                       student_keys: dict[int, str]) -> list[dict]:
    """Each student (N -> key) sampled by DDIM at its N in the :data:`CLIP_MODES` (cached), FD and the rest."""
    out = []
    for n, key in sorted(student_keys.items()):
        manifest = store.read_manifest(key)
        model = load_model(store, key)
        denoiser = evaluation.sampling_denoiser(model, autocast_dtype=None, compile=False)
        for label, mode in CLIP_MODES.items():
            cache = f"{records_prefix(manifest['sha256'])}/ddim-{label}-{n:04d}-{eval_hash(cfg)}.json"

            def compute(n: int = n, label: str = label, mode: dict = mode, model=model, denoiser=denoiser,
                        sha256: str = manifest["sha256"]) -> dict:
                def sample(noise: Tensor) -> Tensor:
                    with torch.inference_mode():
                        return samplers.ddim(denoiser, noise, num_steps=n, schedule=model.schedule, **mode)

                metrics = _measure(cfg, ctx, sample, shape=model.image_shape, seed=cfg.eval.seed)
                return {"sampler": label, "steps": n, "gamma": None, **metrics, "model_sha256": sha256}

            out.append(_cached(store, cache, compute))
            print(f"{label} {n:>3d} steps: {ctx.extractor.fd_name} {out[-1][ctx.extractor.fd_name]:.3f}", flush=True)
    return out
