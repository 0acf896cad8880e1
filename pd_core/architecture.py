"""What a checkpoint's network is, as its manifest records it: the project's U-Net or a diffusers UNet2DModel.

Every network is called ``net(z, logsnr[, y[, w]])`` (what :class:`~pd_core.denoiser.Denoiser` wraps): ``y``
class labels for a class-conditional one, ``w`` guidance weights for one with a guidance embedding
(guided distillation, :mod:`pd_core.guidance`; only the project's U-Net has one).
The manifest records what rebuilds it, never a pickle:

- ``"unet": {UNetSpec fields}`` -> :class:`PdUNet` (:class:`pd_core.unet.UNet`);
- ``"diffusers_unet2d": {UNet2DModel config}`` with a discrete ``"schedule"`` -> :class:`DiffusersUNet2D`
  (:class:`pd_core.interop.diffusers.DiffusersUNetNet`: the UNet2DModel run at the fractional
  timestep of each log-SNR; needs the optional ``diffusers`` package);
- ``"diffusers_unet2d_condition": {UNet2DConditionModel config}`` with a discrete ``"schedule"`` ->
  :class:`pd_core.interop.sd_unet.TextUNetCondition` (``net(z, logsnr, context[, w])``, prompt
  embeddings as ``context``).

Students keep their teacher's architecture: :func:`architecture_from_manifest` of the teacher's
manifest builds both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pd_core.interop import diffusers as diffusers_io
from pd_core.interop.sd_unet import TEXT_UNET_KEY, TextUNetCondition
from pd_core.schedule import DiscreteSchedule, schedule_from_dict
from pd_core.unet import UNet, UNetSpec, spec_from_dict, spec_to_dict

DIFFUSERS_KEY = "diffusers_unet2d"  # manifest field of a diffusers UNet2DModel's config
DIFFUSERS_SCHEDULER_KEY = "diffusers_scheduler"  # manifest field of its scheduler config (for exports)


class Architecture(Protocol):
    """A network a checkpoint's tensors fit: how to build it, what it takes, what the manifest says about it."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network denoises."""
        ...

    @property
    def num_classes(self) -> int:
        """Number of class labels it is conditioned on (0: unconditional)."""
        ...

    @property
    def null_class(self) -> bool:
        """Whether label ``num_classes`` is a trained "no class" (classifier-free guidance)."""
        ...

    @property
    def guidance_embedding(self) -> bool:
        """Whether the network also takes the guidance weight w (a guided-distilled student)."""
        ...

    @property
    def out_channels(self) -> int:
        """Channels of the network output (2C for the ``both`` parameterization)."""
        ...

    def build(self, *, dropout: float) -> nn.Module:
        """A freshly initialised network ``net(z, logsnr[, y])`` with this dropout."""
        ...

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of the network's state dict."""
        ...

    def manifest_fields(self) -> dict:
        """The manifest fields that describe it (:func:`architecture_from_manifest` reads them back)."""
        ...

    def without_dropout(self) -> Architecture:
        """The same network with dropout 0 (what a student's or a sampler's manifest records)."""
        ...


@functools.lru_cache(maxsize=16)
def _unet_state_shapes(spec: UNetSpec) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing drawn from the RNG
        return {k: tuple(v.shape) for k, v in UNet(spec).state_dict().items()}


@dataclass(frozen=True)
class PdUNet:
    """The project's U-Net (:mod:`pd_core.unet`)."""

    spec: UNetSpec

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.spec.in_channels, self.spec.image_size, self.spec.image_size)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def null_class(self) -> bool:
        return self.spec.null_class

    @property
    def guidance_embedding(self) -> bool:
        return self.spec.guidance_embedding

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    def build(self, *, dropout: float) -> nn.Module:
        return UNet(dataclasses.replace(self.spec, dropout=dropout))

    def with_guidance_embedding(self) -> PdUNet:
        """The same U-Net plus a zero-initialised guidance embedding (guided distillation's stage-1 student)."""
        return PdUNet(dataclasses.replace(self.spec, guidance_embedding=True))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return _unet_state_shapes(dataclasses.replace(self.spec, dropout=0.0))

    def manifest_fields(self) -> dict:
        return {"unet": spec_to_dict(self.spec)}

    def without_dropout(self) -> PdUNet:
        return PdUNet(dataclasses.replace(self.spec, dropout=0.0))


@dataclass(frozen=True)
class DiffusersUNet2D:
    """A diffusers UNet2DModel (config as canonical JSON) run on its training table's timesteps."""

    config_json: str  # the UNet2DModel config, json.dumps(..., sort_keys=True)
    schedule: DiscreteSchedule
    scheduler_config_json: str = "{}"  # the scheduler config it came with (kept for exports)

    @classmethod
    def of(cls, unet_config: dict, *, schedule: DiscreteSchedule, scheduler_config: dict | None = None
           ) -> DiffusersUNet2D:
        """From config dicts."""
        return cls(config_json=json.dumps(unet_config, sort_keys=True), schedule=schedule,
                   scheduler_config_json=json.dumps(scheduler_config or {}, sort_keys=True))

    @property
    def config(self) -> dict:
        """The UNet2DModel config."""
        return json.loads(self.config_json)

    @property
    def scheduler_config(self) -> dict:
        """The scheduler config of the imported model."""
        return json.loads(self.scheduler_config_json)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (int(c.get("in_channels", 3)), int(c["sample_size"]), int(c["sample_size"]))

    @property
    def num_classes(self) -> int:
        return int(self.config.get("num_class_embeds") or 0)

    @property
    def null_class(self) -> bool:
        return False  # a UNet2DModel's class embedding has no "no class" row this project trained

    @property
    def guidance_embedding(self) -> bool:
        return False

    @property
    def out_channels(self) -> int:
        return int(self.config.get("out_channels", 3))

    def build(self, *, dropout: float) -> nn.Module:
        return diffusers_io.DiffusersUNetNet(diffusers_io.build_unet(self.config, dropout=dropout),
                                             schedule=self.schedule)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return diffusers_io.state_shapes(self.config)

    def manifest_fields(self) -> dict:
        return {"unet": None, DIFFUSERS_KEY: self.config, DIFFUSERS_SCHEDULER_KEY: self.scheduler_config}

    def without_dropout(self) -> DiffusersUNet2D:
        return DiffusersUNet2D.of({**self.config, "dropout": 0.0}, schedule=self.schedule,
                                  scheduler_config=self.scheduler_config)


def architecture_from_manifest(manifest: dict) -> Architecture:
    """The network a checkpoint's manifest describes (ValueError naming the field when it describes none)."""
    if manifest.get(TEXT_UNET_KEY) is not None:  # a text-to-image UNet2DConditionModel
        return TextUNetCondition.from_manifest(manifest)
    if manifest.get(DIFFUSERS_KEY) is not None:
        schedule = schedule_from_dict(manifest.get("schedule"))
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError("a diffusers UNet2DModel checkpoint must record its discrete schedule "
                             "(manifest field 'schedule' with kind 'discrete')")
        return DiffusersUNet2D.of(manifest[DIFFUSERS_KEY], schedule=schedule,
                                  scheduler_config=manifest.get(DIFFUSERS_SCHEDULER_KEY))
    if isinstance(manifest.get("unet"), dict):
        return PdUNet(spec_from_dict(manifest["unet"]))
    raise ValueError(f"the manifest describes no network (neither 'unet' nor '{DIFFUSERS_KEY}')")


def as_architecture(arch: Architecture | UNetSpec) -> Architecture:
    """``arch`` itself, or the project's U-Net of a UNetSpec."""
    return PdUNet(arch) if isinstance(arch, UNetSpec) else arch
