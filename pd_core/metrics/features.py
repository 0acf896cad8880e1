"""Feature extractors as a protocol, batched extraction, and reference features cached in a byte store.

Anything with ``__call__(uint8 images (N, C, H, W)) -> (N, D)`` and the two metric names is a
feature extractor: the FID Inception (``fid``/``kid``) and the project's classifier
(``fd_<dataset>``/``kid_<dataset>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from pd_core.images import to_uint8
from pd_core.metrics.stats import FeatureStats, StreamingStats

log = logging.getLogger(__name__)


class ByteStore(Protocol):
    """The part of ``pd_core.store.CheckpointStore`` the metrics need (keys are relative paths)."""

    def put_bytes(self, key: str, data: bytes) -> Any: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...


class FeatureExtractor(Protocol):
    """uint8 images (N, C, H, W) -> features (N, D); names the FD and KID metrics it yields."""

    fd_name: str
    kid_name: str

    def __call__(self, images: Tensor) -> Tensor: ...


class MemoryByteStore:
    """A dict-backed :class:`ByteStore` for tests and one-off scripts."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.blobs[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes:
        if key not in self.blobs:
            raise FileNotFoundError(key)
        return self.blobs[key]

    def exists(self, key: str) -> bool:
        return key in self.blobs


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@torch.no_grad()
def extract_features(extractor: Callable[[Tensor], Tensor], images: Tensor, *, batch_size: int = 256) -> np.ndarray:
    """Features (N, D) float32 of ``images`` (uint8, or float in [-1, 1], quantised first), in batches."""
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        u = to_uint8(images[start:start + batch_size])  # (B, C, H, W) uint8
        chunks.append(extractor(u).float().cpu().numpy())
    return np.concatenate(chunks, axis=0)


@dataclass(frozen=True)
class ReferenceFeatures:
    """Features of a reference split (N, D) float32, their Gaussian fit, and the cache manifest."""

    features: np.ndarray
    stats: FeatureStats
    manifest: dict


def _reference_keys(key: str) -> tuple[str, str, str]:
    return f"{key}/features.safetensors", f"{key}/stats.npz", f"{key}/manifest.json"


def load_or_compute_reference(store: ByteStore, key: str, *, extractor: Callable[[Tensor], Tensor],
                              images: Tensor | Callable[[], Tensor], extractor_id: str,
                              batch_size: int = 256) -> ReferenceFeatures:
    """Reference features + stats of a real split, computed once and cached under ``key``.

    ``images`` may be a zero-argument callable so the split is only loaded on a cache miss.
    ``extractor_id`` (e.g. the classifier weights' sha256) is recorded; a cached entry made with
    another extractor is recomputed, so stale references are never compared with new features.
    The manifest is written last: its presence marks a complete entry.
    """
    feat_key, stats_key, manifest_key = _reference_keys(key)
    if store.exists(manifest_key):
        manifest = json.loads(store.get_bytes(manifest_key))
        if manifest.get("extractor_id") == extractor_id:
            blob = store.get_bytes(feat_key)
            if sha256_hex(blob) != manifest.get("features_sha256"):
                raise ValueError(f"reference features at {feat_key!r} do not match their manifest sha256; "
                                 f"delete {key!r} to recompute")
            feats = load_safetensors(blob)["features"].numpy()
            return ReferenceFeatures(features=feats, stats=FeatureStats.from_bytes(store.get_bytes(stats_key)),
                                     manifest=manifest)
        log.info("reference %s was made with extractor %s, not %s: recomputing", key,
                 manifest.get("extractor_id"), extractor_id)
    imgs = images() if callable(images) else images
    feats = extract_features(extractor, imgs, batch_size=batch_size)  # (N, D)
    stats = StreamingStats().update(feats).finalize()
    blob = save_safetensors({"features": torch.from_numpy(np.ascontiguousarray(feats))})
    store.put_bytes(feat_key, blob)
    store.put_bytes(stats_key, stats.to_bytes())
    manifest = {"kind": "reference_features", "extractor_id": extractor_id, "n": int(feats.shape[0]),
                "dim": int(feats.shape[1]), "features_sha256": sha256_hex(blob)}
    store.put_bytes(manifest_key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return ReferenceFeatures(features=feats, stats=stats, manifest=manifest)
