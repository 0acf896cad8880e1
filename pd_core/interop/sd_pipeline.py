"""A Stable Diffusion-style pipeline's networks, read from a checked folder, as our samplers see them.

:func:`read_text_to_image_model` reads every file a load needs once (bounded, safetensors only,
never unpickled; which folders are accepted is :mod:`pd_core.interop.sd_folder`), hashes what it
read (the pipeline's lineage) and builds nothing; the ``build_*`` functions turn the VAE, text
encoder and tokenizer into modules (the UNet: :mod:`pd_core.interop.sd_unet`).
:func:`encode_prompts` is ``StableDiffusionPipeline.encode_prompt``'s text path (max-length padding,
truncation, the last hidden state). diffusers and transformers are imported inside the functions
that need them (optional dependencies).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from pd_core.interop.diffusers import require_diffusers, scheduler_alphas_cumprod
from pd_core.interop.sd_folder import (
    DiffusersImportError,
    TextToImageFolder,
    read_file,
    read_text_to_image,
    source_sha256,
)
from pd_core.interop.sd_unet import PREFIX, TextUNetCondition, load_strict
from pd_core.schedule import DiscreteSchedule


def require_transformers():
    """The ``transformers`` module, or ImportError saying how to install the optional extra."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"this needs the optional transformers package ({err}): pip install -e '.[diffusers]'") \
            from None
    return transformers


@dataclass(frozen=True)
class TextToImageModel:
    """What an import of a text-to-image folder reads: configs, tensors, tokenizer files, schedule, hashes."""

    configs: dict  # component -> config (as sd_folder checked it)
    weights: dict  # "unet" / "vae" / "text_encoder" -> {name: tensor} (float32)
    tokenizer_files: dict  # file name -> bytes
    parameterization: str  # eps / v / x from the scheduler's prediction_type
    schedule: DiscreteSchedule  # the scheduler's own float32 alphas_cumprod
    hashes: dict  # component -> file name -> sha256 of the bytes read
    source: str  # the folder's location

    @property
    def source_sha256(self) -> str:
        """The pipeline's lineage hash (:func:`pd_core.interop.sd_folder.source_sha256`)."""
        return source_sha256(self.hashes)

    @property
    def scaling_factor(self) -> float:
        return float(self.configs["vae"].get("scaling_factor", 0.18215))


def _tensors(raw: bytes, *, component: str, url: str) -> dict[str, Tensor]:
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise DiffusersImportError(f"{component}: {url} is not a readable safetensors file "
                                   f"({str(err).splitlines()[0]})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def read_text_to_image_model(uri: str | TextToImageFolder, *, storage_options: dict | None = None) -> TextToImageModel:
    """Read a checked text-to-image folder (``diffusers:<folder>``, its location, or a checked folder)."""
    tti = uri if isinstance(uri, TextToImageFolder) else read_text_to_image(uri, storage_options=storage_options)
    hashes: dict = {}
    weights: dict = {}
    tokenizer_files: dict = {}
    for component, names in tti.files.items():
        hashes[component] = {}
        for name in names:
            raw = read_file(tti, component, name)
            hashes[component][name] = hashlib.sha256(raw).hexdigest()
            if name.endswith(".safetensors"):
                weights[component] = _tensors(raw, component=component, url=tti.url(component, name))
            elif component == "tokenizer":
                tokenizer_files[name] = raw
    try:
        acp = scheduler_alphas_cumprod(tti.scheduler_config, source=tti.url("scheduler", "scheduler_config.json"))
        schedule = DiscreteSchedule(acp)
    except (DiffusersImportError, ValueError) as err:
        raise DiffusersImportError(f"scheduler: {err}") from None
    return TextToImageModel(configs=tti.configs, weights=weights, tokenizer_files=tokenizer_files,
                            parameterization=tti.parameterization, schedule=schedule, hashes=hashes,
                            source=tti.location)


def build_vae(model: TextToImageModel) -> nn.Module:
    return load_strict(require_diffusers().AutoencoderKL.from_config(model.configs["vae"]), model.weights["vae"],
                 component="vae")


def build_text_encoder(model: TextToImageModel) -> nn.Module:
    transformers = require_transformers()
    config = transformers.CLIPTextConfig.from_dict(model.configs["text_encoder"])
    return load_strict(transformers.CLIPTextModel(config), model.weights["text_encoder"], component="text_encoder")


def build_tokenizer(model: TextToImageModel):
    """The CLIPTokenizer of the files read (written to a private temporary folder, loaded from there)."""
    with tempfile.TemporaryDirectory(prefix="pd-tokenizer-") as tmp:
        for name, raw in model.tokenizer_files.items():
            (Path(tmp) / name).write_bytes(raw)
        return require_transformers().CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> Tensor:
    """(B, L, D) prompt embeddings as ``StableDiffusionPipeline.encode_prompt`` makes them ("" for the null)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    mask = ids.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.input_ids.to(device), attention_mask=None if mask is None else mask.to(device))[0]


def teacher_checkpoint(model: TextToImageModel) -> tuple[dict[str, Tensor], dict]:
    """(tensors, manifest fields) of the imported UNet as a store checkpoint: the UNet's tensors under ``unet.``,
    its architecture, schedule and parameterization, and the pipeline it came from (the lineage hash as
    ``parent_sha256``; the VAE, text encoder and tokenizer stay in the folder, named by ``text_to_image``)."""
    arch = TextUNetCondition.of(model.configs["unet"], schedule=model.schedule,
                                scheduler_config=model.configs["scheduler"])
    fields = {**arch.manifest_fields(), "schedule": model.schedule.to_dict(),
              "parameterization": model.parameterization, "parent_sha256": model.source_sha256,
              "num_train_timesteps": model.schedule.num_timesteps,
              "text_to_image": {"source": model.source, "sha256": model.source_sha256, "files": model.hashes}}
    return {PREFIX + k: v for k, v in model.weights["unet"].items()}, fields
