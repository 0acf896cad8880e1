"""Checkpoints made ready to sample: an eval-mode network from a manifest's architecture, as a Denoiser.

A checkpoint describes its network (:func:`pd_core.architecture.architecture_from_manifest`: the
project's U-Net or a diffusers UNet2DModel) and its parameterization, so loading needs no config.
Weights are checked against the architecture tensor by tensor before loading, so a mismatch is one
line naming the first misfit.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn

from pd_core._checks import state_misfit
from pd_core.architecture import Architecture, PdUNet, architecture_from_manifest
from pd_core.denoiser import Denoiser
from pd_core.schedule import CosineSchedule, Schedule, schedule_from_dict
from pd_core.store import CheckpointStore, StoreError
from pd_core.unet import UNetSpec


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p/pipelines/x/teacher`` -> (``s3://b/p/pipelines/x``, ``teacher``)."""
    uri = uri.rstrip("/")
    root, key = posixpath.split(uri)
    if not key or not root:
        raise ValueError(f"checkpoint URI {uri!r} must name a checkpoint folder, "
                         f"e.g. file:///runs/store/pipelines/x/teacher")
    return root, key


def check_weights_fit(tensors: dict, arch: Architecture | UNetSpec, *, source: str) -> None:
    """StoreError (one line, naming the first misfit) unless ``tensors`` are exactly the state dict of ``arch``."""
    misfit = state_misfit(tensors, (PdUNet(arch) if isinstance(arch, UNetSpec) else arch).state_shapes())
    if misfit is not None:
        raise StoreError(f"{source}: weights do not fit the architecture in its manifest ({misfit}); the checkpoint "
                         f"or its manifest was altered - re-export it or point at the right checkpoint")


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint made ready to sample: the denoiser plus what the manifest says about it."""

    denoiser: Denoiser
    manifest: dict
    steps: int
    schedule: Schedule
    architecture: Architecture

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it samples."""
        return self.architecture.image_shape

    @property
    def num_classes(self) -> int:
        """Class labels it is conditioned on (0: unconditional)."""
        return self.architecture.num_classes


def manifest_schedule(manifest: dict) -> Schedule:
    """The noise schedule a checkpoint was trained on (the cosine of its logsnr range when none is recorded)."""
    if "schedule" in manifest:
        return schedule_from_dict(manifest["schedule"])
    return CosineSchedule(logsnr_min=float(manifest.get("logsnr_min", -20.0)),
                          logsnr_max=float(manifest.get("logsnr_max", 20.0)))


def model_from_tensors(tensors: dict, manifest: dict, *, source: str, device: torch.device | str = "cpu",
                       arch: Architecture | None = None) -> LoadedModel:
    """An eval-mode network built from the manifest's architecture (or ``arch``, one whose state dict is the
    manifest's: a text UNet over a caption table), loaded with ``tensors`` (strict)."""
    try:
        arch = arch if arch is not None else architecture_from_manifest(manifest)
    except (ValueError, TypeError, KeyError) as err:
        raise StoreError(f"{source}: the manifest does not describe a network this version can build ({err})") from err
    check_weights_fit(tensors, arch, source=source)
    net: nn.Module = arch.build(dropout=0.0)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise StoreError(f"{source}: weights do not fit the architecture in its manifest ({first})") from err
    net = net.to(device).eval().requires_grad_(False)
    return LoadedModel(denoiser=Denoiser(net, parameterization=manifest["parameterization"]), manifest=manifest,
                       steps=int(manifest["steps"]), schedule=manifest_schedule(manifest), architecture=arch)


def load_model(store: CheckpointStore, key: str, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a verified checkpoint into an eval-mode network wrapped as a Denoiser."""
    tensors, manifest = store.load_checkpoint(key)
    return model_from_tensors(tensors, manifest, source=store.uri(key), device=device)


def model_from_files(*, weights_path: str, manifest: dict, device: torch.device | str = "cpu") -> LoadedModel:
    """A model from a local safetensors file and its manifest (e.g. downloaded from MLflow); never unpickles."""
    return model_from_tensors(load_file(weights_path), manifest, source=weights_path, device=device)


def load_model_uri(uri: str, *, storage_options: dict | None = None,
                   device: torch.device | str = "cpu") -> LoadedModel:
    """:func:`load_model` from a checkpoint folder URI such as ``file:///.../rounds/03-0032``."""
    root, key = split_uri(uri)
    return load_model(CheckpointStore(root, storage_options=storage_options), key, device=device)
