"""A text-to-image pipeline's evaluations: prompts -> N-step DDIM over latents -> VAE decode -> features, per w.

Prompts: with ``eval.class_names`` n_0 .. n_{K-1}, example i asks for p_i = ``eval.prompt_template`` of
n_{i mod K} (class-balanced, in the order of the noise) and ``prompt_accuracy`` = (1/N) sum_i
[classifier(x_i) = i mod K]; without them, the data's distinct non-empty captions in turn (no accuracy).
Images are :func:`pd_core.interop.sd_sampling.decode_latents` of the sampled latents (the pipeline's
decode), quantised to uint8 before any feature network. Samplers, each at guidance weight w:

- ``teacher_ddim``: our trailing DDIM over the teacher, classifier-free guided
  eps_w = (1 + w) eps(z, c) - w eps(z, c_0): 2 UNet calls a step at w > 0 (1 at w = 0);
- ``diffusers_ddim``: stock ``StableDiffusionPipeline`` with the scheduler a user swaps in,
  ``DDIMScheduler.from_config`` of the folder's own scheduler config (its spacing, ``steps_offset``,
  ``set_alpha_to_one``, as the folder ships them; :func:`baseline_ddim_config`) at ``guidance_scale =
  1 + w``, on the same latents and prompt embeddings. One departure from ``from_config``: a config
  that does not set ``clip_sample`` (Euler, DPM-Solver and PNDM configs have no such field) gets
  ``clip_sample = False``, not DDIM's default True, since clipping x_hat to [-1, 1] is a pixel-space
  rule and these are latents; a config that sets it (every saved DDIMScheduler config) is honoured as
  is. The pixel path (:mod:`pd_core.interop.diffusers_ddim`) keeps ``DDIMPipeline``'s own rebuild,
  default included, because there x is the image. Records say which (``clip_sample``,
  ``clip_sample_from``: ``folder`` or ``latent default``);
- ``distilled``: a student's N-step DDIM (one call a step; a student with the guidance embedding gets
  phi_d(w), one distilled without it is measured at w = 0).

Every record has ``w`` and ``unet_calls`` (steps times the calls a step), so the teacher at N/2 steps is
the baseline at the same number of UNet calls as an N-step student. Features: ``eval.features =
classifier`` is our classifier trained on the caption folder's images labelled by the class their caption
names (reported as ``fd_captions``: FD in our classifier's feature space), ``inception`` the given
weights. Records are cached under the weights' sha256 and the evaluation settings, as the other pipelines', and the
teacher folder's hash (its VAE decodes, its text encoder and scheduler make the baseline); so are the grids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging

import torch
from torch import Tensor

from pd_core import images
from pd_core.config import Config
from pd_core.data.captions import load_caption_texts, load_captions
from pd_core.data.class_captions import prompt_classes
from pd_core.evaluation import (
    FeatureContext,
    _cached,
    display_grid_key,
    eval_hash,
    grid_key,
    records_prefix,
)
from pd_core.interop.diffusers import require_diffusers
from pd_core.interop.sd_folder import folder_fingerprint, read_text_to_image
from pd_core.interop.sd_pipeline import TextToImageModel, encode_prompts, read_text_to_image_model
from pd_core.interop.sd_sampling import PromptSampler, decode_latents, sample_latents
from pd_core.metrics import evaluate_sampler, load_inception, load_or_compute_reference, load_or_train_classifier
from pd_core.models import load_model
from pd_core.store import CheckpointStore

log = logging.getLogger("pd_core.evaluation")
TEXT_SAMPLERS = ("teacher_ddim", "diffusers_ddim", "distilled")


@functools.lru_cache(maxsize=2)
def _teacher_folder(uri: str, options_json: str, fingerprint: str) -> TextToImageModel:  # noqa: ARG001 (cache key)
    return read_text_to_image_model(uri, storage_options=json.loads(options_json))


def teacher_folder(cfg: Config) -> TextToImageModel:
    """The pipeline's text-to-image folder (VAE, text encoder, tokenizer, scheduler), read once per process while
    its files are unchanged: the read is cached under the folder's configs and files' sizes and modification
    stamps (:func:`pd_core.interop.sd_folder.folder_fingerprint`), so a component replaced in place is read anew."""
    uri, options = cfg.pipeline.teacher_uri or "", dict(cfg.storage.storage_options)
    fingerprint = folder_fingerprint(read_text_to_image(uri, storage_options=options))
    return _teacher_folder(uri, json.dumps(options, sort_keys=True), fingerprint)


def _data_id(cfg: Config) -> str:
    ev = cfg.eval
    text = f"{cfg.data.url}|{cfg.data.image_size}|{ev.class_names}|{ev.prompt_template}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def eval_prompts(cfg: Config, *, start: int, count: int) -> list[str]:
    """The prompts of examples start .. start + count - 1 (module docstring)."""
    names = cfg.eval.class_names
    if names:
        return [cfg.eval.prompt_template.format(names[i % len(names)]) for i in range(start, start + count)]
    captions = _data_captions(cfg.data.url or "")
    return [captions[i % len(captions)] for i in range(start, start + count)]


def _data_captions(url: str) -> tuple[str, ...]:
    """The data's distinct non-empty captions, read from its metadata.jsonl each call (never a stale copy)."""
    distinct = [c for c in dict.fromkeys(load_caption_texts(url, split="train")) if c]
    if not distinct:
        raise ValueError(f"{url}: every caption is empty; set eval.class_names to say what to prompt for")
    return tuple(distinct)


def _labelled(cfg: Config):
    """(train images, labels, test images, labels): the captions that name one of eval.class_names."""
    names, template = tuple(cfg.eval.class_names or ()), cfg.eval.prompt_template
    index = {template.format(n) for n in names}

    def split(name: str) -> tuple[Tensor, Tensor]:
        data = load_captions(cfg.data.url or "", size=cfg.data.image_size, split=name)
        keep = [i for i, c in enumerate(data.captions) if c in index]
        if not keep:
            raise ValueError(f"{data.source}: no caption names one of eval.class_names ({template.format(names[0])!r}, "
                             f"...); the feature classifier has nothing to learn")
        labels = prompt_classes([data.captions[i] for i in keep], names=names, template=template)
        return data.images[keep], labels

    return lambda: (*split("train"), *split("test"))


def text_feature_context(cfg: Config, store: CheckpointStore, *, device: torch.device | str = "cpu") -> FeatureContext:
    """The feature network (module docstring) and the reference features of the caption folder's test split."""
    ev = cfg.eval
    classifier = None
    if ev.class_names:
        key = f"classifiers/captions-{_data_id(cfg)}-s{ev.seed}-e{ev.classifier_epochs}-k{len(ev.class_names)}"
        classifier = load_or_train_classifier(store, key, load_data=_labelled(cfg), dataset="captions", seed=ev.seed,
                                              epochs=ev.classifier_epochs, device=device,
                                              num_classes=len(ev.class_names))
    if ev.features == "inception":
        extractor = load_inception(ev.inception_weights, sha256=ev.inception_sha256, device=device)
        extractor_id = ev.inception_sha256 or "inception-unverified"
    elif classifier is None:
        raise ValueError("eval.features=classifier on image-caption data needs eval.class_names (the classes the "
                         "captions name) to train the classifier; or set eval.features=inception")
    else:
        extractor, extractor_id = classifier, classifier.sha256
    reference = load_or_compute_reference(
        store, f"references/captions-{_data_id(cfg)}-test-{extractor_id[:12]}", extractor=extractor,
        images=lambda: load_captions(cfg.data.url or "", size=cfg.data.image_size, split="test").images,
        extractor_id=extractor_id)
    return FeatureContext(extractor=extractor, reference=reference, extractor_id=extractor_id, classifier=classifier)


def unet_calls(*, sampler: str, steps: int, w: float, student_takes_w: bool = False) -> int:
    """UNet calls of one N-step sample: 2 a step for a classifier-free guided teacher at w > 0, else 1."""
    two = sampler in ("teacher_ddim", "diffusers_ddim") and w > 0 and not student_takes_w
    return steps * (2 if two else 1)


def baseline_ddim_config(scheduler_config: dict) -> tuple[dict, str]:
    """The ``diffusers_ddim`` baseline's DDIMScheduler config (module docstring) and where its ``clip_sample`` came
    from: ``folder`` when the folder's config sets it, else ``latent default`` (False)."""
    if "clip_sample" in scheduler_config:
        return dict(scheduler_config), "folder"
    return {**scheduler_config, "clip_sample": False}, "latent default"


def _stock_latents(sampler: PromptSampler, scheduler_config: dict, *, context: Tensor, null: Tensor, noise: Tensor,
                   steps: int, w: float) -> Tensor:
    """Stock StableDiffusionPipeline (DDIMScheduler of :func:`baseline_ddim_config`) latents at scale 1 + w."""
    diffusers = require_diffusers()
    pipe = diffusers.StableDiffusionPipeline(
        vae=sampler.vae, text_encoder=sampler.text_encoder, tokenizer=sampler.tokenizer, unet=sampler.net.unet,
        scheduler=diffusers.DDIMScheduler.from_config(baseline_ddim_config(scheduler_config)[0]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=context, negative_prompt_embeds=null.expand_as(context), latents=noise.clone(),
                num_inference_steps=steps, guidance_scale=1.0 + w, output_type="latent").images


def prompt_sampler(cfg: Config, store: CheckpointStore, key: str, *, device: torch.device | str = "cpu"
                   ) -> PromptSampler:
    """The checkpoint at ``key`` (teacher or student) with the folder's VAE, text encoder and tokenizer."""
    loaded = load_model(store, key, device=device)
    sampler = PromptSampler.of(teacher_folder(cfg), unet=loaded.denoiser.net.unet,
                               parameterization=loaded.manifest["parameterization"])
    for module in (sampler.vae, sampler.text_encoder):
        module.to(device)
    return sampler


@torch.no_grad()
def sample_images(sampler: PromptSampler, *, kind: str, prompts: list[str], noise: Tensor, steps: int, w: float,
                  scheduler_config: dict | None = None) -> Tensor:
    """Images in [-1, 1] of one sampler of the module docstring (``kind``) for ``prompts`` from latent ``noise``."""
    if kind == "diffusers_ddim":
        context = encode_prompts(sampler.tokenizer, sampler.text_encoder, prompts)
        null = encode_prompts(sampler.tokenizer, sampler.text_encoder, [""])
        latents = _stock_latents(sampler, scheduler_config or {}, context=context, null=null, noise=noise,
                                 steps=steps, w=w)
    else:
        latents = sample_latents(sampler, prompts=prompts, w=w, steps=steps, noise=noise)
    return decode_latents(sampler.vae, latents, scaling_factor=sampler.scaling_factor)


def text_record_key(*, model_sha256: str, folder_sha256: str, kind: str, steps: int, w: float,
                    eval_hash_: str) -> str:
    """Where a record is cached: under the UNet's sha256, named by the sampler, steps, w, the evaluation settings and
    the folder's hash (its VAE decodes every sample, its text encoder and scheduler make the baseline)."""
    return f"{records_prefix(model_sha256)}/t2i-{kind}-{steps:04d}-w{w:g}-{eval_hash_}-f{folder_sha256[:12]}.json"


def evaluate_text_checkpoint(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *, key: str, kind: str,
                             steps: int, w: float, device: torch.device | str = "cpu") -> dict:
    """One record (module docstring) of the checkpoint at ``key`` sampled by ``kind`` in ``steps`` steps at ``w``."""
    if kind not in TEXT_SAMPLERS:
        raise ValueError(f"kind must be one of {', '.join(TEXT_SAMPLERS)}; got {kind!r}")
    manifest = store.read_manifest(key)
    if manifest is None:
        raise FileNotFoundError(f"no complete checkpoint at {store.uri(key)} to evaluate")
    takes_w = manifest.get("diffusers_unet2d_condition", {}).get("time_cond_proj_dim") is not None
    calls = unet_calls(sampler=kind, steps=steps, w=w, student_takes_w=takes_w)
    folder = teacher_folder(cfg)
    cache = text_record_key(model_sha256=manifest["sha256"], folder_sha256=folder.source_sha256, kind=kind,
                            steps=steps, w=w, eval_hash_=eval_hash(cfg))
    scheduler_config = folder.configs["scheduler"]

    def compute() -> dict:
        sampler = prompt_sampler(cfg, store, key, device=device)
        ev = cfg.eval
        names = ev.class_names
        drawn = [0]

        def fn(noise: Tensor, labels: Tensor | None = None) -> Tensor:
            if labels is not None:  # class-balanced: example i asks for class i mod K
                prompts = [ev.prompt_template.format(names[int(c)]) for c in labels]
            else:
                prompts = eval_prompts(cfg, start=drawn[0], count=noise.shape[0])
            drawn[0] += noise.shape[0]
            return sample_images(sampler, kind=kind, prompts=prompts, noise=noise.to(device), steps=steps, w=w,
                                 scheduler_config=scheduler_config).float().cpu()

        c, s = cfg.data.image_size, sampler.latent_shape
        metrics = evaluate_sampler(fn, num_samples=ev.num_samples, batch_size=ev.batch_size, seed=ev.seed,
                                   feature_extractor=ctx.extractor, reference_stats=ctx.reference.stats,
                                   image_shape=(3, c, c), noise_shape=s, reference_features=ctx.reference.features,
                                   kid_subsets=ev.kid_subsets, kid_subset_size=min(ev.kid_subset_size, ev.num_samples),
                                   num_classes=len(names) if names else None,
                                   label_classifier=ctx.classifier.predict if ctx.classifier is not None else None)
        if "sample_accuracy" in metrics:
            metrics["prompt_accuracy"] = metrics.pop("sample_accuracy")
        log.info("%s %d steps w %g (%d UNet calls): %s", kind, steps, w, calls,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "n_samples"))
        baseline = {}
        if kind == "diffusers_ddim":
            config, source = baseline_ddim_config(scheduler_config)
            baseline = {"clip_sample": bool(config["clip_sample"]), "clip_sample_from": source}
        return {"sampler": kind, "steps": steps, "gamma": None, "w": w, "unet_calls": calls, **metrics,
                "sampling_dtype": "fp32", "model_sha256": manifest["sha256"],
                "teacher_folder_sha256": folder.source_sha256, **baseline}

    return {**_cached(store, cache, compute), "model_uri": store.uri(key)}


def write_text_grid(cfg: Config, store: CheckpointStore, *, key: str, steps: int, w: float,
                    device: torch.device | str = "cpu") -> str:
    """One row of ``eval.grid_size`` samples per prompt (the first few evaluation prompts), captioned with the
    prompts, next to the checkpoint; the display grid's URI. Written once per weights, teacher folder and w; the
    UNet and the VAE run ``eval.batch_size`` samples at a time."""
    manifest = store.read_manifest(key) or {}
    raw_key, out_key = grid_key(key, sampler="ddim", steps=steps, w=w), display_grid_key(key, sampler="ddim",
                                                                                           steps=steps, w=w)
    made_from = f"{raw_key}.sha256"
    stamp = f"{manifest.get('sha256')} {teacher_folder(cfg).source_sha256}"  # the UNet's and the decoder folder's
    if not (store.exists(made_from) and store.get_bytes(made_from).decode().strip() == stamp
            and store.exists(out_key)):
        cols = max(cfg.eval.grid_size, 1)
        rows = len(cfg.eval.class_names) if cfg.eval.class_names else min(cols, len(_data_captions(
            cfg.data.url or "")))
        prompts = eval_prompts(cfg, start=0, count=rows)
        sampler = prompt_sampler(cfg, store, key, device=device)
        noise = torch.randn((rows * cols, *sampler.latent_shape), generator=torch.Generator().manual_seed(
            cfg.eval.seed)).to(device)
        asked, step = [p for p in prompts for _ in range(cols)], max(1, cfg.eval.batch_size)
        x = torch.cat([sample_images(sampler, kind="distilled", prompts=asked[i:i + step], noise=noise[i:i + step],
                                     steps=steps, w=w).float().cpu() for i in range(0, len(asked), step)])
        u = images.to_uint8(x)
        caption = f"{cfg.pipeline.name}, {steps} step{'' if steps == 1 else 's'}, w = {w:g}: " + "; ".join(
            f"row {i + 1} '{p}'" for i, p in enumerate(prompts))
        store.put_bytes(raw_key, images.png_bytes(images.make_grid(u, nrow=cols)))
        store.put_bytes(out_key, images.png_bytes(images.display_grid(u, caption=caption, nrow=cols)))
        store.put_bytes(made_from, stamp.encode())
    return store.uri(out_key)


def text_evaluation_weights(cfg: Config, manifest: dict) -> list[float]:
    """eval.guidance_weights for the teacher (its empty prompt is the null) and a student that takes w; [0] for a
    student distilled without the guidance embedding (its rounds distilled the conditional model)."""
    takes_w = manifest.get("diffusers_unet2d_condition", {}).get("time_cond_proj_dim") is not None
    return list(cfg.eval.guidance_weights) if manifest.get("kind") == "teacher" or takes_w else [0.0]
