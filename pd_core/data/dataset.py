"""A split in memory (ImageData) and stateless, resumable batches over it (BatchSampler, derive_seed).

Images are float32 (N, C, H, W) in [-1, 1], labels int64 (N,) or None. Batch k of a sampler is
positions [k B, (k+1) B) of the concatenation of per-epoch permutations, epoch e seeded with
``derive_seed(seed, "epoch", e)``; the optional horizontal flip is drawn per (seed, step).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageData:
    """A split in memory: images (N, C, H, W) float32 in [-1, 1], labels (N,) int64 or None."""

    images: Tensor
    labels: Tensor | None
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ValueError(f"images must be a float32 (N, C, H, W) tensor; got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels is not None and (self.labels.shape != (self.images.shape[0],)
                                        or self.labels.dtype != torch.int64):
            raise ValueError(f"labels must be int64 of shape ({self.images.shape[0]},); got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        """C."""
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """H (= W)."""
        return self.images.shape[2]

    def to(self, device: torch.device | str) -> ImageData:
        """A copy on ``device`` (put a small dataset on the GPU once instead of copying every batch)."""
        labels = self.labels.to(device) if self.labels is not None else None
        return ImageData(self.images.to(device), labels, self.num_classes, self.name)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (seed, epoch, ...), stable across processes and platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class BatchSampler:
    """Stateless batches: ``batch(step)`` depends only on (data, batch_size, seed, step).

    The training stream is the concatenation of per-epoch permutations, epoch e drawn from a
    generator seeded with (seed, e); batch k is positions [k B, (k+1) B) of that stream. A run
    resumed at step k therefore sees exactly the batches an uninterrupted run would, and a batch
    may straddle an epoch boundary (no example is dropped, B > N works).
    """

    def __init__(self, data: ImageData, *, batch_size: int, seed: int, random_flip: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if len(data) < 1:
            raise ValueError(f"dataset {data.name} is empty")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self._perm_cache: dict[int, Tensor] = {}  # a cache of pure functions of (seed, epoch), not state

    @property
    def steps_per_epoch(self) -> float:
        """Batches per pass over the data (fractional when B does not divide N)."""
        return len(self.data) / self.batch_size

    def permutation(self, epoch: int) -> Tensor:
        """The order of examples in ``epoch`` (int64, (N,))."""
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:  # only neighbouring epochs are ever needed together
                self._perm_cache.clear()
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm_cache[epoch] = torch.randperm(len(self.data), generator=gen)
        return self._perm_cache[epoch]

    def indices(self, step: int) -> Tensor:
        """Example indices of batch ``step`` (int64, (B,))."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        n = len(self.data)
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        for epoch in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
            parts.append(self.permutation(epoch)[lo:hi])
        return torch.cat(parts)  # (B,)

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        """(images (B, C, H, W), labels (B,) or None) of batch ``step``."""
        idx = self.indices(step).to(self.data.images.device)
        images = self.data.images[idx]  # (B, C, H, W)
        labels = self.data.labels[idx] if self.data.labels is not None else None
        if self.random_flip:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "flip", step))
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(images.device)  # (B,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels
