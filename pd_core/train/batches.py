"""Training batches on the runtime's device: per rank, from a device-resident dataset where it fits."""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core.data import BatchSampler, derive_seed
from pd_core.train.loop import BatchFn
from pd_core.train.runtime import Runtime


def rank_batches(sample_batch: BatchFn, runtime: Runtime) -> BatchFn:
    """Rank r of W = N P (N nodes of P processes) takes rows ``(r mod N) B/N .. (r mod N + 1) B/N - 1`` of
    batch ``k P + floor(r / N)`` of ``sample_batch``'s stream at step k (on one node, N = 1: batch k W + r).

    For a :class:`~pd_core.data.BatchSampler` with batch B, batches kP .. kP + P - 1 are exactly
    batch k of the same sampler with batch P B, so the global batch is P B whatever N, and rank r
    holds its rows r B/N .. (r + 1) B/N - 1: the same rows (and data order) as rank r of one node of
    W processes with batch B/N (random flips aside, which are drawn per batch).
    """
    if runtime.world_size <= 1:
        return sample_batch
    world, rank, nodes = runtime.world_size, runtime.rank, runtime.nodes
    if nodes <= 1:
        return lambda step: sample_batch(step * world + rank)
    per_node, part = world // nodes, rank % nodes

    def fetch(step: int) -> tuple[Tensor, Tensor | None]:
        x, y = sample_batch(step * per_node + rank // nodes)
        rows = slice(part * (x.shape[0] // nodes), (part + 1) * (x.shape[0] // nodes))
        return x[rows], (y[rows] if y is not None else None)
    return fetch


class DeviceBatches:
    """A BatchSampler's batches served from a copy of its dataset in device memory.

    ``batches(step)`` equals ``sampler.batch(step)`` moved to ``device``: the indices (and the flips)
    come from the sampler's own stateless functions of (seed, step), travel as one small pinned
    tensor copied asynchronously, and the images are gathered on the device. No host sync.
    """

    def __init__(self, sampler: BatchSampler, device: torch.device):
        self.sampler = sampler
        self.device = device
        self.images = sampler.data.images.to(device)  # (N, C, H, W), once
        self.labels = sampler.data.labels.to(device) if sampler.data.labels is not None else None

    def _flips(self, step: int, count: int) -> Tensor:
        # the same draw as data.BatchSampler.batch (tests/test_ddp.py checks they agree)
        gen = torch.Generator().manual_seed(derive_seed(self.sampler.seed, "flip", step))
        return torch.rand(count, generator=gen) < 0.5  # (B,)

    def __call__(self, step: int) -> tuple[Tensor, Tensor | None]:
        idx = self.sampler.indices(step)  # (B,) int64 on the CPU
        rows = [idx, self._flips(step, len(idx)).long()] if self.sampler.random_flip else [idx]
        host = torch.stack(rows)  # (1 or 2, B)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        images = self.images.index_select(0, dev[0])  # (B, C, H, W)
        if self.sampler.random_flip:
            images = torch.where(dev[1].bool()[:, None, None, None], images.flip(-1), images)
        labels = self.labels.index_select(0, dev[0]) if self.labels is not None else None
        return images, labels


def _fits_on_device(sampler: BatchSampler, runtime: Runtime, *, fraction: float = 0.25) -> bool:
    data = sampler.data
    size = data.images.numel() * data.images.element_size()
    free, _ = torch.cuda.mem_get_info(runtime.device)
    return size <= fraction * free


def device_batches(sample_batch: BatchFn, runtime: Runtime) -> BatchFn:
    """Batches on the runtime's device: from a device-resident dataset where possible, else copied per batch."""
    owner = getattr(sample_batch, "__self__", None)
    if runtime.is_cuda and isinstance(owner, BatchSampler) and sample_batch.__func__ is BatchSampler.batch \
            and _fits_on_device(owner, runtime):
        fetch_raw: BatchFn = DeviceBatches(owner, runtime.device)
    else:
        fetch_raw = sample_batch

    def fetch(step: int) -> tuple[Tensor, Tensor | None]:
        x, y = fetch_raw(step)
        if x.device != runtime.device:
            x = (x.pin_memory() if runtime.is_cuda else x).to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if y is not None and y.device != runtime.device:
            y = y.to(runtime.device, non_blocking=True)
        return x, y
    return fetch

