"""A pipeline's evaluations over the store: features, teacher baselines, distilled students, floors.

Every measurement is a flat record (see ``metrics.table``) cached as JSON under ``evals/<weights
sha256>/``, keyed by the evaluation settings, so a rerun of a finished pipeline, or another pipeline
that imports the same teacher, re-measures nothing.
Same noise (seed), same N and the same reference split for every number that is compared.
A class-conditional model is measured on class-balanced labels (example i asks for class i mod K)
at a guidance weight w (record field ``w``; pd_core.guidance), with ``sample_accuracy``: how often
the feature classifier sees the class that was asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pd_core import images, samplers
from pd_core.config import Config, config_hash
from pd_core.data import load_split
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


SAMPLERS = ("ddim", "stochastic", "stochastic_two_step")


def make_sample_fn(model: LoadedModel, *, sampler: str, steps: int, gamma: float | None, seed: int,
                   device: torch.device, w: float = 0.0) -> Callable[..., Tensor]:
    """noise (B, C, H, W) [, labels (B,)] -> images in [-1, 1] with the given sampler (clipping on, as sampling does).

    ``stochastic`` is the ancestral sampler (variance coefficient ``gamma``), ``stochastic_two_step``
    the sampler of Meng et al. (samplers.stochastic_two_step). With labels (a class-conditional
    model) the denoiser samples those classes at guidance weight ``w`` (pd_core.guidance.guided).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    gen = torch.Generator(device=device).manual_seed(seed + 7919)  # stochastic sampler's own noise stream
    spec = model.denoiser.net.spec

    def sample(noise: Tensor, labels: Tensor | None = None) -> Tensor:
        z = noise.to(device)
        denoiser = model.denoiser if labels is None else guided(model.denoiser, spec=spec, y=labels.to(device), w=w)
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
    return int(manifest["unet"].get("num_classes", 0)) > 0


def evaluation_weights(cfg: Config, manifest: dict) -> list[float | None]:
    """The guidance weights a checkpoint is measured at: [None] for an unconditional net; eval.guidance_weights
    for a class-conditional teacher and for a net that takes w; [0] for a distilled conditional student without
    the w input (its rounds distilled the conditional model only, not the null class)."""
    if not is_conditional(manifest):
        return [None]
    if manifest.get("kind") == "teacher" or manifest["unet"].get("guidance_embedding", False):
        return list(cfg.eval.guidance_weights)
    return [0.0]


def evaluate_checkpoint(cfg: Config, store: CheckpointStore, ctx: FeatureContext, *, key: str, label: str, sampler: str,
                        steps: int, gamma: float | None = None, device: torch.device | str = "cpu",
                        progress: Progress | None = None, w: float | None = None) -> dict:
    """One record: the checkpoint at ``key`` sampled with ``sampler`` in ``steps`` steps; cached in the store.

    A class-conditional checkpoint is sampled on class-balanced labels at guidance weight ``w``
    (default 0, the conditional model) and its record has ``w`` and ``sample_accuracy``.
    """
    g = f"-g{gamma:.2f}" if gamma is not None else ""
    manifest = store.read_manifest(key)
    if manifest is None:
        raise FileNotFoundError(f"no complete checkpoint at {store.uri(key)} to evaluate")
    conditional = is_conditional(manifest)
    if not conditional and w is not None:
        raise ValueError(f"{store.uri(key)} is not class-conditional: it has no guidance weight to evaluate at")
    w = (0.0 if w is None else float(w)) if conditional else None
    # Keyed by the weights' sha256, not by the checkpoint's key: a teacher imported into another
    # pipeline (pd run --teacher-uri) reuses the measurements made on the same weights.
    cache = f"{records_prefix(manifest['sha256'])}/{sampler}-{steps:04d}{g}{_weight_tag(w)}-{eval_hash(cfg)}.json"
    device = torch.device(device)

    def compute() -> dict:
        model = load_model(store, key, device=device)
        ev = cfg.eval
        fn = make_sample_fn(model, sampler=sampler, steps=steps, gamma=gamma, seed=ev.seed, device=device,
                            w=w or 0.0)
        spec = model.denoiser.net.spec
        metrics = evaluate_sampler(fn, num_samples=ev.num_samples, batch_size=ev.batch_size, seed=ev.seed,
                                   feature_extractor=ctx.extractor, reference_stats=ctx.reference.stats,
                                   image_shape=(spec.in_channels, spec.image_size, spec.image_size),
                                   reference_features=ctx.reference.features,
                                   kid_subsets=ev.kid_subsets, kid_subset_size=min(ev.kid_subset_size, ev.num_samples),
                                   progress=progress, num_classes=spec.num_classes if conditional else None,
                                   label_classifier=ctx.classifier.predict if ctx.classifier is not None else None)
        log.info("%s %s %d steps%s%s: %s", label, sampler, steps, f" gamma {gamma}" if gamma is not None else "",
                 f" w {w:g}" if w is not None else "",
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("n_samples",)))
        return {"sampler": label, "steps": steps, "gamma": gamma, **({"w": w} if w is not None else {}), **metrics,
                "model_sha256": model.manifest["sha256"], "model_uri": store.uri(key)}

    return {**_cached(store, cache, compute), "model_uri": store.uri(key)}


def write_grid(cfg: Config, store: CheckpointStore, *, key: str, sampler: str, steps: int,
               device: torch.device | str = "cpu", w: float | None = None) -> str:
    """A PNG of the first samples (the evaluation's noise) next to the checkpoint: grid_size x grid_size images,
    or for a class-conditional model one row of grid_size images per class, at guidance weight ``w``."""
    manifest = store.read_manifest(key)
    if manifest is None:
        raise FileNotFoundError(f"no complete checkpoint at {store.uri(key)} to sample")
    conditional = is_conditional(manifest)
    w = (0.0 if w is None else float(w)) if conditional else None
    out_key = grid_key(key, sampler=sampler, steps=steps, w=w)
    if not store.exists(out_key):
        device = torch.device(device)
        model = load_model(store, key, device=device)
        spec = model.denoiser.net.spec
        shape = (spec.in_channels, spec.image_size, spec.image_size)
        cols = cfg.eval.grid_size
        n = cols * (spec.num_classes if conditional else cols)
        noise = sample_noise(seed=cfg.eval.seed, start=0, count=n, shape=shape)
        fn = make_sample_fn(model, sampler=sampler, steps=steps, gamma=None, seed=cfg.eval.seed, device=device,
                            w=w or 0.0)
        if conditional:  # row k asks for class k
            labels = class_balanced_labels(start=0, count=spec.num_classes, num_classes=spec.num_classes)
            x = fn(noise, labels.repeat_interleave(cols))
        else:
            x = fn(noise)
        store.put_bytes(out_key, images.png_bytes(images.make_grid(x.float().cpu(), nrow=cols)))
    return store.uri(out_key)


def teacher_step_counts(cfg: Config) -> list[int]:
    """Step counts at which the teacher is measured: every N of the chain plus eval.teacher_extra_steps."""
    chain = [cfg.distill.start_steps] + [s for _, s in cfg.distill.rounds()]
    return sorted(set(chain) | set(cfg.eval.teacher_extra_steps), reverse=True)
