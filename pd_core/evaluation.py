"""A pipeline's evaluations over the store: features, teacher baselines, distilled students, floors.

Every measurement is a flat record (see ``metrics.table``) cached as JSON under ``evals/<weights
sha256>/``, keyed by the evaluation settings and the sampling precision, so a rerun of a finished
pipeline, or another pipeline that imports the same teacher, re-measures nothing.
Same noise (seed), same N and the same reference split for every number that is compared.
A class-conditional model is measured on class-balanced labels (example i asks for class i mod K)
at a guidance weight w (record field ``w``; pd_core.guidance), with ``sample_accuracy``: how often
the feature classifier sees the class that was asked for.

Sampling runs the network under the runtime's autocast (``runtime.precision``; bf16 where the
hardware has it), optionally compiled (``eval.compile``); the denoiser casts the network's output
back to fp32, so the sampler's arithmetic, the uint8 images and every statistic stay fp32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pd_core import images, samplers
from pd_core.architecture import architecture_from_manifest
from pd_core.config import Config, config_hash
from pd_core.data import load_split
from pd_core.denoiser import DenoiserFn
from pd_core.guidance import class_balanced_labels, guided
from pd_core.metrics import (
    ClassifierFeatures,
    FeatureExtractor,
    ReferenceFeatures,
    evaluate_sampler,
    extract_features,
    load_inception,
    load_or_compute_reference,
    load_or_train_classifier,
    real_floor,
    sample_noise,
)
from pd_core.models import LoadedModel, load_model
from pd_core.store import CheckpointStore
from pd_core.train.runtime import autocast_dtype_for, cpu_supports_bf16
from pd_core.train.threads import adaptive_threads

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FeatureContext:
    """The feature network and the reference split's features every record is measured against."""

    extractor: FeatureExtractor  # uint8 (N, C, H, W) -> (N, D), with fd_name / kid_name
    reference: ReferenceFeatures
    extractor_id: str  # sha256 of the feature network's weights
    classifier: ClassifierFeatures | None = None  # the feature classifier, for sample_accuracy (labelled data)


def eval_hash(cfg: Config) -> str:
    """Hash of what decides an evaluation's numbers (data and eval settings), independent of training.

    eval.guidance_weights counts only when it is not the default [0]: a record carries its own w.
    """
    omit = ("eval.guidance_weights",) if cfg.eval.guidance_weights == [0.0] else ()
    return config_hash(cfg, sections=("data", "eval"), omit=omit)[:12]


def classifier_key(cfg: Config) -> str:
    """Store key of the feature classifier for ``cfg``'s data and eval settings (features=classifier)."""
    return f"classifiers/{cfg.data.name}-{cfg.data.image_size}-s{cfg.eval.seed}-e{cfg.eval.classifier_epochs}"


def floor_key(cfg: Config, *, extractor_id: str) -> str:
    """Store key of the real-vs-real floor at ``eval.num_samples`` for one feature network."""
    return (f"references/floor-{cfg.data.name}-{cfg.data.image_size}-n{cfg.eval.num_samples}-{extractor_id[:12]}-"
            f"{eval_hash(cfg)}.json")


def records_prefix(sha256: str) -> str:
    """Where the evaluation records of the weights with this sha256 are cached."""
    return f"evals/{sha256[:16]}"


def grid_key(key: str, *, sampler: str, steps: int, w: float | None = None) -> str:
    """Store key of the sample grid of the checkpoint at ``key`` (at guidance weight ``w`` for a conditional one)."""
    return f"{key}.eval/grid-{sampler}-{steps:04d}{_weight_tag(w)}.png"


def display_grid_key(key: str, *, sampler: str, steps: int, w: float | None = None) -> str:
    """Store key of the same grid for people: upscaled to a readable size, with a caption."""
    return f"{key}.eval/samples-{sampler}-{steps:04d}{_weight_tag(w)}.png"


def _feature_classifier(cfg: Config, store: CheckpointStore, *, device: torch.device | str) -> ClassifierFeatures:
    """The project's classifier for ``cfg``'s data, loaded from the store or trained and cached there."""
    data_cfg, ev = cfg.data, cfg.eval

    def labelled():
        train, test = load_split(data_cfg, split="train"), load_split(data_cfg, split="test")
        if train.labels is None or test.labels is None:
            raise ValueError(f"data.name={data_cfg.name}: the feature classifier needs labels; "
                             f"use eval.features=inception for unlabelled data")
        return train.images, train.labels, test.images, test.labels

    key = classifier_key(cfg)
    classifier = load_or_train_classifier(store, key, load_data=labelled, dataset=data_cfg.name, seed=ev.seed,
                                          epochs=ev.classifier_epochs, device=device)
    if classifier.manifest.get("test_accuracy") is not None:
        log.info("feature classifier %s: test accuracy %.4f", key, classifier.manifest["test_accuracy"])
    return classifier


def feature_context(cfg: Config, store: CheckpointStore, *, device: torch.device | str = "cpu") -> FeatureContext:
    """Load or train the feature network, and load or compute the reference (test split) features; both cached.

    The feature classifier comes along for ``sample_accuracy`` when the model is class-conditional
    (with Inception features too).
    """
    data_cfg, ev = cfg.data, cfg.eval
    test_images = lambda: load_split(data_cfg, split="test").images  # noqa: E731  loaded on a cache miss only
    classifier = None
    if ev.features == "inception":
        extractor = load_inception(ev.inception_weights, sha256=ev.inception_sha256, device=device)
        extractor_id = ev.inception_sha256 or "inception-unverified"
        if cfg.model.class_conditional:
            classifier = _feature_classifier(cfg, store, device=device)
    else:
        extractor = classifier = _feature_classifier(cfg, store, device=device)
        extractor_id = extractor.sha256
    reference_key = f"references/{data_cfg.name}-{data_cfg.image_size}-test-{extractor_id[:12]}"
    reference = load_or_compute_reference(store, reference_key, extractor=extractor, images=test_images,
                                          extractor_id=extractor_id)
    return FeatureContext(extractor=extractor, reference=reference, extractor_id=extractor_id, classifier=classifier)


def _cached(store: CheckpointStore, key: str, compute: Callable[[], dict]) -> dict:
    if store.exists(key):
        return json.loads(store.get_bytes(key))
    record = compute()
    store.put_bytes(key, json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def floor_record(cfg: Config, store: CheckpointStore, ctx: FeatureContext) -> dict:
    """Real-vs-real floor at the evaluation's N: N training images scored like N samples would be."""
    n = cfg.eval.num_samples
    key = floor_key(cfg, extractor_id=ctx.extractor_id)

    def compute() -> dict:
        train = load_split(cfg.data, split="train")
        if len(train) < n:
            raise ValueError(f"eval.num_samples={n} exceeds the {len(train)} training images available for the "
                             f"real-vs-real floor; lower eval.num_samples")
        feats = extract_features(ctx.extractor, train.images[:n])  # (N, D)
        ev = cfg.eval
        metrics = real_floor(feats, ctx.reference.features, fd_name=ctx.extractor.fd_name,
                             kid_name=ctx.extractor.kid_name, kid_subsets=ev.kid_subsets,
                             kid_subset_size=min(ev.kid_subset_size, n), seed=ev.seed)
        return {"sampler": "floor", "steps": None, **metrics, "seconds_per_image": 0.0}

    return _cached(store, key, compute)


def sampling_dtype(cfg: Config, *, device: torch.device) -> torch.dtype | None:
    """The autocast dtype evaluation samples under: ``runtime.precision`` resolved for ``device`` (None: fp32)."""
    return autocast_dtype_for(cfg.runtime.precision, device=device,
                              cpu_bf16=device.type == "cpu" and cpu_supports_bf16())


def dtype_tag(dtype: torch.dtype | None) -> str:
    """``fp32`` / ``bf16`` / ``fp16``: how a record's samples were computed."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def sampling_denoiser(model: LoadedModel, *, autocast_dtype: torch.dtype | None, compile: bool,
                      labels: Tensor | None = None, w: float = 0.0) -> DenoiserFn:
    """The model's denoiser (for a class-conditional network: sampling classes ``labels`` at guidance weight
    ``w``, :func:`pd_core.guidance.guided`) with its network under autocast to ``autocast_dtype`` (outputs
    fp32), compiled if asked.

    ``compile`` wraps the whole denoiser in ``torch.compile`` (default mode, static shapes: one
    graph per batch shape, reused by every checkpoint of the same architecture).
    """
    denoiser = model.denoiser if labels is None else guided(model.denoiser, arch=model.architecture, y=labels, w=w)
    if autocast_dtype is not None:
        device_type = next(model.denoiser.net.parameters()).device.type
        plain = denoiser

        def denoiser(z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
            with torch.autocast(device_type=device_type, dtype=autocast_dtype):
                return plain(z, logsnr)
    return samplers.compiled(denoiser, mode=None) if compile else denoiser


SAMPLERS = ("ddim", "stochastic", "stochastic_two_step")


def make_sample_fn(model: LoadedModel, *, sampler: str, steps: int, gamma: float | None, seed: int,
                   device: torch.device, autocast_dtype: torch.dtype | None = None, compile: bool = False,
                   w: float = 0.0) -> Callable[..., Tensor]:
    """noise (B, C, H, W) [, labels (B,)] -> images in [-1, 1] (fp32) with the given sampler (clipping on, as
    sampling does).

    ``stochastic`` is the ancestral sampler (variance coefficient ``gamma``), ``stochastic_two_step``
    the sampler of Meng et al. (samplers.stochastic_two_step). The network runs under autocast to
    ``autocast_dtype`` (None: fp32) and, with ``compile``, under ``torch.compile`` (see
    :func:`sampling_denoiser`). A class-conditional model samples the ``labels`` given, else classes
    0, 1, ..., K - 1, 0, 1, ... in the order the noise comes (calls are consecutive batches of one
    evaluation), so every class is sampled equally often; either way at guidance weight ``w``
    (:func:`pd_core.guidance.guided`: x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null), or the w input
    of a guided-distilled student).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    gen = torch.Generator(device=device).manual_seed(seed + 7919)  # stochastic sampler's own noise stream
    unconditional = None if model.num_classes else sampling_denoiser(model, autocast_dtype=autocast_dtype,
                                                                       compile=compile)
    drawn = [0]  # examples sampled so far (for the class labels)

    def sample(noise: Tensor, labels: Tensor | None = None) -> Tensor:
        z = noise.to(device)
        denoiser = unconditional
        if denoiser is None:
            if labels is None:
                labels = class_balanced_labels(start=drawn[0], count=z.shape[0], num_classes=model.num_classes)
            denoiser = sampling_denoiser(model, autocast_dtype=autocast_dtype, compile=compile,
                                         labels=labels.to(device), w=w)
        elif labels is not None:
            raise ValueError("class labels need a class-conditional model; this one is unconditional")
        drawn[0] += z.shape[0]
        with torch.inference_mode():
            if sampler == "ddim":
                return samplers.ddim(denoiser, z, num_steps=steps, schedule=model.schedule)
            if sampler == "stochastic":
                return samplers.ancestral(denoiser, z, num_steps=steps, gamma=gamma, generator=gen,
                                          schedule=model.schedule)
            return samplers.stochastic_two_step(denoiser, z, num_steps=steps, generator=gen, schedule=model.schedule)

    return sample


def _weight_tag(w: float | None) -> str:
    return "" if w is None else f"-w{w:g}"


def is_conditional(manifest: dict) -> bool:
    """Whether a checkpoint's net is class-conditional (its records then carry a guidance weight w)."""
    return architecture_from_manifest(manifest).num_classes > 0


def evaluation_weights(cfg: Config, manifest: dict) -> list[float | None]:
    """The guidance weights a checkpoint is measured at: [None] for an unconditional net; eval.guidance_weights
    for a class-conditional teacher and for a net that takes w; [0] for a distilled conditional student without
    the w input (its rounds distilled the conditional model only, not the null class). A teacher without a
    null class (an imported one) is measured at w = 0 only: it has no unconditional model to guide with."""
    arch = architecture_from_manifest(manifest)
    if arch.num_classes < 1:
        return [None]
    if arch.guidance_embedding:
        return list(cfg.eval.guidance_weights)
    if manifest.get("kind") == "teacher":
        return [w for w in cfg.eval.guidance_weights if w == 0 or arch.null_class] or [0.0]
    return [0.0]


def evaluate_checkpoint(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *, key: str, label: str, sampler: str,
                        steps: int, gamma: float | None = None, device: torch.device | str = "cpu",
                        progress: Progress | None = None, w: float | None = None) -> dict:
    """One record: the checkpoint at ``key`` sampled with ``sampler`` in ``steps`` steps; cached in the store.

    A class-conditional checkpoint is sampled on class-balanced labels at guidance weight ``w``
    (default 0, the conditional model) and its record has ``w`` and ``sample_accuracy``.
    """
    manifest = store.read_manifest(key)
    if manifest is None:
        raise FileNotFoundError(f"no complete checkpoint at {store.uri(key)} to evaluate")
    return evaluate_model(cfg, store, ctx, load=lambda: load_model(store, key, device=device),
                          sha256=manifest["sha256"], model_uri=store.uri(key), label=label, sampler=sampler,
                          steps=steps, gamma=gamma, device=device, progress=progress, w=w,
                          conditional=is_conditional(manifest))


def evaluate_model(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *, load: Callable[[], LoadedModel],
                   sha256: str, model_uri: str, label: str, sampler: str, steps: int, gamma: float | None = None,
                   device: torch.device | str = "cpu", progress: Progress | None = None, w: float | None = None,
                   conditional: bool = False) -> dict:
    """One record of the model ``load()`` gives (called on a cache miss only), cached in ``store`` under its
    weights' ``sha256`` (which may live anywhere: another store, an MLflow model).

    Sampled under ``runtime.precision`` resolved for ``device`` (:func:`sampling_dtype`); the record
    says which (``sampling_dtype``), and records of other precisions are cached under other keys.
    ``conditional`` (what the model's manifest says: :func:`is_conditional`): the model is sampled on
    class-balanced labels at guidance weight ``w`` (default 0), its record has ``w`` and
    ``sample_accuracy``, and records of other weights are cached under other keys.
    """
    if not conditional and w is not None:
        raise ValueError(f"{model_uri} is not class-conditional: it has no guidance weight to evaluate at")
    w = (0.0 if w is None else float(w)) if conditional else None
    g = f"-g{gamma:.2f}" if gamma is not None else ""
    device = torch.device(device)
    dtype = sampling_dtype(cfg, device=device)
    precision = "" if dtype is None else f"-{dtype_tag(dtype)}"  # fp32 records keep their original keys
    # Keyed by the weights' sha256, not by the checkpoint's key: a teacher imported into another
    # pipeline (pd run --teacher-uri) reuses the measurements made on the same weights.
    cache = f"{records_prefix(sha256)}/{sampler}-{steps:04d}{g}{_weight_tag(w)}-{eval_hash(cfg)}{precision}.json"

    def compute() -> dict:
        model = load()
        ev = cfg.eval
        sample = make_sample_fn(model, sampler=sampler, steps=steps, gamma=gamma, seed=ev.seed, device=device,
                                autocast_dtype=dtype, compile=ev.compile, w=w or 0.0)
        threads = adaptive_threads() if cfg.runtime.threads is None and device.type == "cpu" else None

        def fn(noise: Tensor, labels: Tensor | None = None) -> Tensor:
            if threads is not None:
                threads.update()  # threads follow the machine's load, batch by batch
            return sample(noise, labels)

        metrics = evaluate_sampler(fn, num_samples=ev.num_samples, batch_size=ev.batch_size, seed=ev.seed,
                                   feature_extractor=ctx.extractor, reference_stats=ctx.reference.stats,
                                   image_shape=model.image_shape,
                                   reference_features=ctx.reference.features,
                                   kid_subsets=ev.kid_subsets, kid_subset_size=min(ev.kid_subset_size, ev.num_samples),
                                   progress=progress, num_classes=model.num_classes if conditional else None,
                                   label_classifier=ctx.classifier.predict if ctx.classifier is not None else None)
        log.info("%s %s %d steps%s%s: %s", label, sampler, steps, f" gamma {gamma}" if gamma is not None else "",
                 f" w {w:g}" if w is not None else "",
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("n_samples",)))
        return {"sampler": label, "steps": steps, "gamma": gamma, **({"w": w} if w is not None else {}), **metrics,
                "sampling_dtype": dtype_tag(dtype), "model_sha256": sha256, "model_uri": model_uri}

    return {**_cached(store, cache, compute), "model_uri": model_uri}


def write_grid(cfg: Config, store: CheckpointStore, *, key: str, sampler: str, steps: int,
               device: torch.device | str = "cpu", w: float | None = None) -> str:
    """The first samples (the evaluation's noise) next to the checkpoint; the display grid's URI.

    grid_size x grid_size images or, for a class-conditional model, one row of grid_size images per
    class (row k asks for class k) at guidance weight ``w`` (default 0). Two PNGs of the same samples:
    the samples' own pixels at :func:`grid_key` and, at :func:`display_grid_key`, the grid for people
    (nearest-neighbour upscaled to at least ``images.DISPLAY_MIN_WIDTH`` pixels, captioned with
    :func:`images.grid_caption`). Written once per checkpoint weights (and w): a ``.sha256`` file next
    to them names the weights they show, and a checkpoint retrained at the same key gets new grids.
    """
    manifest = store.read_manifest(key)
    if manifest is None:
        raise FileNotFoundError(f"no complete checkpoint at {store.uri(key)} to sample")
    conditional = is_conditional(manifest)
    w = (0.0 if w is None else float(w)) if conditional else None
    raw_key = grid_key(key, sampler=sampler, steps=steps, w=w)
    out_key = display_grid_key(key, sampler=sampler, steps=steps, w=w)
    made_from = f"{raw_key}.sha256"  # written last: present and equal means both PNGs show these weights
    current = (store.exists(made_from) and store.get_bytes(made_from).decode().strip() == manifest["sha256"]
               and store.exists(out_key) and store.exists(raw_key))
    if not current:
        device = torch.device(device)
        model = load_model(store, key, device=device)
        cols = cfg.eval.grid_size
        n = cols * (model.num_classes if conditional else cols)
        noise = sample_noise(seed=cfg.eval.seed, start=0, count=n, shape=model.image_shape)
        fn = make_sample_fn(model, sampler=sampler, steps=steps, gamma=None, seed=cfg.eval.seed, device=device,
                            w=w or 0.0)
        if conditional:  # row k asks for class k
            labels = class_balanced_labels(start=0, count=model.num_classes, num_classes=model.num_classes)
            x = fn(noise, labels.repeat_interleave(cols))
        else:
            x = fn(noise)
        u = images.to_uint8(x.float().cpu())
        caption = images.grid_caption(pipeline=cfg.pipeline.name, manifest=model.manifest, sampler=sampler,
                                      steps=steps, w=w)
        store.put_bytes(raw_key, images.png_bytes(images.make_grid(u, nrow=cols)))
        store.put_bytes(out_key, images.png_bytes(images.display_grid(u, caption=caption, nrow=cols)))
        store.put_bytes(made_from, manifest["sha256"].encode())
    return store.uri(out_key)


def teacher_step_counts(cfg: Config) -> list[int]:
    """Step counts at which the teacher is measured: every N of the chain plus eval.teacher_extra_steps."""
    chain = [cfg.distill.start_steps] + [s for _, s in cfg.distill.rounds()]
    return sorted(set(chain) | set(cfg.eval.teacher_extra_steps), reverse=True)
