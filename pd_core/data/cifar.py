"""CIFAR-10, binary version: strict parsing of its records and the loader of a split.

A record is one label byte (0..9) then 3 * 32 * 32 bytes (1024 R, 1024 G, 1024 B, row-major).
The python (pickle) version is never read.
"""

from __future__ import annotations

import numpy as np

from pd_core.config import DataConfig
from pd_core.data.common import DatasetError, Split
from pd_core.data.download import _CIFAR_FILES
from pd_core.data.files import join_url, read_bytes, url_exists
from pd_core.data.locate import _locate

CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 R, 1024 G, 1024 B bytes


def parse_cifar_binary(raw: bytes, *, source: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records (1 label byte + 3072 CHW bytes) -> uint8 (N, 3, 32, 32), labels (N,)."""
    if not raw or len(raw) % CIFAR_RECORD:
        raise DatasetError(f"{source} has {len(raw)} bytes, not a whole number of {CIFAR_RECORD}-byte CIFAR-10 "
                           "records; it is truncated or not the binary version (the python/pickle version is "
                           "not read)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)  # (N, 3073)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DatasetError(f"{source} has label {int(labels.max())}; CIFAR-10 labels are 0..9 (is it CIFAR-100?)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _find_cifar(root: str, name: str) -> str | None:
    for candidate in (join_url(root, name), join_url(root, "cifar-10-batches-bin", name)):
        if url_exists(candidate):
            return candidate
    return None


def _load_cifar10(cfg: DataConfig, split: Split) -> tuple[np.ndarray, np.ndarray]:
    _, urls = _locate(cfg, _CIFAR_FILES[split], _find_cifar)
    parts = [parse_cifar_binary(read_bytes(u), source=u) for u in urls]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

