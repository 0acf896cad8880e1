"""Data for the metrics tests: Fashion-MNIST from the local IDX files, random SPD matrices, a linear feature
extractor."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from pd_core import images

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path, offset: int) -> np.ndarray:
    """IDX payload after its header (16 bytes for images, 8 for labels)."""
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _fmnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST split as (uint8 images (N, 1, 28, 28), int64 labels (N,))."""
    prefix = "train" if split == "train" else "t10k"
    x = _idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y = _idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


class LinearExtractor:
    """A fixed random projection: a cheap feature extractor for evaluation tests."""

    fd_name, kid_name = "fd_test", "kid_test"

    def __init__(self, in_dim: int, out_dim: int = 8):
        self.w = torch.randn(in_dim, out_dim, generator=torch.Generator().manual_seed(0))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return images.from_uint8(u).flatten(1) @ self.w
