"""Evaluate any sampler: fixed-seed noise (and, for a conditional model, class-balanced labels) in batches
-> images -> uint8 -> features -> metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from pd_core.guidance import class_balanced_labels
from pd_core.images import to_uint8
from pd_core.metrics.features import FeatureExtractor
from pd_core.metrics.kid import kernel_inception_distance, precision_recall
from pd_core.metrics.stats import FeatureStats, StreamingStats, frechet_distance_stats
from pd_core.train.progress import images_line

log = logging.getLogger(__name__)

SampleFn = Callable[[Tensor], Tensor]  # noise -> images; a conditional model's: (noise, labels) -> images
LabelFn = Callable[[Tensor], Tensor]  # uint8 images (B, C, H, W) -> predicted class labels (B,)
Progress = Callable[[int, int], None]


def sample_noise(*, seed: int, start: int, count: int, shape: tuple[int, ...]) -> Tensor:
    """Noise for examples start .. start + count - 1, float32 on CPU, shape (count, *shape).

    Example i draws N(0, I) from its own counter-based stream: numpy Philox keyed by ``seed`` with
    i in the top word of the 256-bit counter, so streams never overlap. Its noise therefore does
    not depend on the batch size, the device, or how many samples are evaluated: every sampler
    compared, and every N, sees the same z for example i (a 1k evaluation is the first 1k of a
    10k one). Not ``torch.Generator``: its CPU generator keeps only the low 32 bits of a seed, so
    any (seed, i) -> seed packing into 64 bits would silently drop ``seed``.
    """
    if seed < 0 or start < 0 or count < 0:
        raise ValueError(f"seed, start and count must be >= 0; got {seed}, {start}, {count}")
    out = np.empty((count, *shape), dtype=np.float32)
    for j in range(count):
        rng = np.random.Generator(np.random.Philox(key=seed, counter=(start + j) << 192))
        out[j] = rng.standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(out)


def evaluate_sampler(sample_fn: SampleFn, *, num_samples: int, batch_size: int, seed: int,
                     feature_extractor: FeatureExtractor, reference_stats: FeatureStats,
                     image_shape: tuple[int, int, int], reference_features: np.ndarray | None = None,
                     progress: Progress | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     pr_k: int = 3, log_every_s: float = 30.0, num_classes: int | None = None,
                     label_classifier: LabelFn | None = None,
                     noise_shape: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Draw ``num_samples`` images with ``sample_fn(noise) -> images in [-1, 1]`` and score them.

    noise: (B, *image_shape) float32 CPU tensors from :func:`sample_noise`, the same for every
    sampler evaluated with this ``seed`` whatever the batch size (``sample_fn`` moves them to its
    device). Images are quantised to uint8 as a PNG would hold them before features.
    Returns ``{fd_name: FD vs reference_stats, "n_samples", "seconds_per_image"}``, plus
    ``kid_name``, ``<kid_name>_std``, ``precision``, ``recall`` when ``reference_features`` (N, D)
    is given. seconds_per_image times sampling only (up to uint8 on the CPU, which also waits
    for the GPU), not feature extraction.

    With ``num_classes`` K (a class-conditional model), example i asks for class i mod K (the set is
    class-balanced whenever K divides N) and ``sample_fn(noise, labels)`` gets those labels (B,);
    with ``label_classifier`` too, ``sample_accuracy`` is the fraction of samples it classifies as
    the class they asked for. ``noise_shape`` (default ``image_shape``): the noise's shape per example
    when the sampler maps it to images of another shape (latents decoded to pixels).
    """
    if num_samples < 2 or batch_size < 1:
        raise ValueError(f"need num_samples >= 2 and batch_size >= 1; got {num_samples}, {batch_size}")
    stats, feats = StreamingStats(), []
    sampling_s, done, t0, last_log = 0.0, 0, time.perf_counter(), time.perf_counter()
    correct = 0
    while done < num_samples:
        count = min(batch_size, num_samples - done)
        noise = sample_noise(seed=seed, start=done, count=count, shape=tuple(noise_shape or image_shape))
        labels = class_balanced_labels(start=done, count=count, num_classes=num_classes) if num_classes else None
        t = time.perf_counter()
        with torch.no_grad():
            images = sample_fn(noise) if labels is None else sample_fn(noise, labels)
        if tuple(images.shape) != (count, *image_shape):
            raise ValueError(f"sample_fn returned shape {tuple(images.shape)}, expected {(count, *image_shape)}")
        u = to_uint8(images).cpu()  # (B, C, H, W) uint8, exactly the PNG's bytes
        sampling_s += time.perf_counter() - t
        if labels is not None and label_classifier is not None:
            correct += int((label_classifier(u).cpu() == labels).sum())
        f = feature_extractor(u).float().cpu().numpy()  # (B, D)
        stats.update(f)
        feats.append(f)
        done += count
        if progress is not None:
            progress(done, num_samples)
        now = time.perf_counter()
        if now - last_log >= log_every_s or done == num_samples:
            log.info(images_line("evaluate", done=done, total=num_samples, elapsed_s=now - t0))
            last_log = now
    fake = stats.finalize()
    out: dict[str, float] = {feature_extractor.fd_name: frechet_distance_stats(fake, reference_stats),
                             "n_samples": num_samples, "seconds_per_image": sampling_s / num_samples}
    if num_classes and label_classifier is not None:
        out["sample_accuracy"] = correct / num_samples
    if reference_features is not None:
        all_feats = np.concatenate(feats, axis=0)  # (N, D)
        kid, kid_std = kernel_inception_distance(all_feats, reference_features, subsets=kid_subsets,
                                                 subset_size=kid_subset_size, seed=seed)
        out[feature_extractor.kid_name], out[f"{feature_extractor.kid_name}_std"] = kid, kid_std
        out["precision"], out["recall"] = precision_recall(reference_features, all_feats, k=pr_k)
    return out


def real_floor(real_a: np.ndarray, real_b: np.ndarray, *, fd_name: str, kid_name: str, kid_subsets: int = 100,
               kid_subset_size: int = 1000, seed: int = 0, pr_k: int = 3) -> dict[str, float]:
    """The same metrics between two sets of REAL features (e.g. train vs test split) at the same N:
    the best score a perfect sampler could get at that N."""
    a, b = FeatureStats.from_features(real_a), FeatureStats.from_features(real_b)
    kid, kid_std = kernel_inception_distance(real_a, real_b, subsets=kid_subsets, subset_size=kid_subset_size,
                                             seed=seed)
    precision, recall = precision_recall(real_b, real_a, k=pr_k)
    return {fd_name: frechet_distance_stats(a, b), kid_name: kid, f"{kid_name}_std": kid_std,
            "precision": precision, "recall": recall, "n_samples": int(real_a.shape[0])}
