"""The networks and batches the CPU benchmarks time: a preset's U-Net on random data of its shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pd_core.config import Config, load_config
from pd_core.unet import UNet, UNetSpec, unet_spec

CHANNELS = {"cifar10": 3, "fashion_mnist": 1, "mnist": 1, "digits": 1}


@dataclass(frozen=True)
class Workload:
    """A preset's network (dropout 0 unless asked) and a batch of its images."""

    preset: str
    cfg: Config
    spec: UNetSpec
    batch: int

    def describe(self) -> str:
        s = self.spec
        params = sum(p.numel() for p in UNet(s).parameters())
        return (f"preset {self.preset}: U-Net ch {s.ch} mult {list(s.ch_mult)} x{s.num_res_blocks} blocks, "
                f"attn {list(s.attn_resolutions)}, {params / 1e6:.2f}M params, {s.in_channels}x{s.image_size}x"
                f"{s.image_size} images, batch {self.batch}")

    def images(self, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        s = self.spec
        return torch.rand(self.batch, s.in_channels, s.image_size, s.image_size, generator=g) * 2 - 1  # (B, C, H, W)


def workload(preset: str, *, batch: int | None = None, dropout: float = 0.0) -> Workload:
    cfg = load_config(preset=preset)
    spec = unet_spec(cfg, in_channels=CHANNELS.get(cfg.data.name, 3), dropout=dropout)
    return Workload(preset=preset, cfg=cfg, spec=spec, batch=batch or cfg.distill.batch_size)
