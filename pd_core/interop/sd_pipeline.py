"""A Stable Diffusion-style pipeline's networks, read from a checked folder, as our samplers see them.

:func:`read_text_to_image_model` reads every file a load needs once (bounded, safetensors only,
never unpickled; which folders are accepted is :mod:`pd_core.interop.sd_folder`), hashes what it
read (the pipeline's lineage) and builds nothing; the ``build_*`` functions turn it into modules.
The UNet2DConditionModel becomes a net ``net(z, logsnr, context, w=None)`` over the scheduler's own
float32 alpha_bar table (:class:`TextUNetNet`: the fractional timestep tau(lambda) of
:class:`~pd_core.schedule.DiscreteSchedule`, so DDIM over it is diffusers' trailing DDIM), with
``timestep_cond`` = phi_d(w) of :mod:`pd_core.text_guidance` for a UNet with ``time_cond_proj_dim``.
:func:`encode_prompts` is ``StableDiffusionPipeline.encode_prompt``'s text path (max-length padding,
truncation, the last hidden state). :func:`guided_student_unet` is stage 1's student: the teacher's
UNet plus a zero-initialised guidance embedding. diffusers and transformers are imported inside the
functions that need them (optional dependencies).
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
from pd_core.schedule import DiscreteSchedule
from pd_core.text_guidance import guidance_scale_embedding

COND_PROJ_KEY = "time_embedding.cond_proj.weight"  # the guidance embedding's one new tensor
DEFAULT_GUIDANCE_DIM = 256  # time_cond_proj_dim of diffusers' guidance-embedded UNets (LCM)


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


def _load(module: nn.Module, tensors: dict[str, Tensor], *, component: str) -> nn.Module:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise DiffusersImportError(f"{component}: the weights do not fit its config (missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(unexpected)[:3]}); save the pipeline with save_pretrained")
    return module.eval()


def build_cond_unet(config: dict, weights: dict[str, Tensor] | None = None) -> nn.Module:
    """The UNet2DConditionModel of ``config``, with ``weights`` loaded (strictly) when given."""
    unet = require_diffusers().UNet2DConditionModel.from_config(config)
    return unet if weights is None else _load(unet, weights, component="unet")


def build_vae(model: TextToImageModel) -> nn.Module:
    return _load(require_diffusers().AutoencoderKL.from_config(model.configs["vae"]), model.weights["vae"],
                 component="vae")


def build_text_encoder(model: TextToImageModel) -> nn.Module:
    transformers = require_transformers()
    config = transformers.CLIPTextConfig.from_dict(model.configs["text_encoder"])
    return _load(transformers.CLIPTextModel(config), model.weights["text_encoder"], component="text_encoder")


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


def guided_student_unet(teacher: nn.Module, *, dim: int = DEFAULT_GUIDANCE_DIM) -> nn.Module:
    """Stage 1's student: the teacher's UNet2DConditionModel with ``time_cond_proj_dim = dim``, every teacher
    tensor copied and the new ``time_embedding.cond_proj`` (no bias) zero, so it computes the teacher at every w."""
    if teacher.config.time_cond_proj_dim is not None:
        raise ValueError(f"the teacher already has a guidance embedding (time_cond_proj_dim "
                         f"{teacher.config.time_cond_proj_dim})")
    student = require_diffusers().UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if set(missing) != {COND_PROJ_KEY} or unexpected:
        raise RuntimeError(f"the student differs from its teacher beyond {COND_PROJ_KEY}: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.to(next(teacher.parameters()).dtype).eval()


class TextUNetNet(nn.Module):
    """net(z, logsnr, context, w) = unet(z, tau(logsnr), encoder_hidden_states=context, timestep_cond=phi_d(w)).sample.

    tau from the model's own schedule (:meth:`DiscreteSchedule.timestep`); ``w`` only for a UNet with
    ``time_cond_proj_dim`` = d (and required by it), embedded as ``StableDiffusionPipeline`` does.
    """

    def __init__(self, unet: nn.Module, *, schedule: DiscreteSchedule):
        super().__init__()
        self.unet = unet
        self.schedule = schedule

    @property
    def guidance_dim(self) -> int | None:
        return self.unet.config.time_cond_proj_dim

    def at_timestep(self, z: Tensor, timestep: Tensor, context: Tensor, w: Tensor | None = None) -> Tensor:
        dim = self.guidance_dim
        if (dim is None) != (w is None):
            raise ValueError("w is given exactly when the UNet has a guidance embedding (time_cond_proj_dim); got "
                             f"time_cond_proj_dim {dim} and w {'given' if w is not None else 'missing'}")
        cond = None if w is None else guidance_scale_embedding(w, dim=dim).to(device=z.device, dtype=z.dtype)
        return self.unet(z, timestep, encoder_hidden_states=context.to(z.dtype), timestep_cond=cond).sample

    def forward(self, z: Tensor, logsnr: Tensor, context: Tensor, w: Tensor | None = None) -> Tensor:
        return self.at_timestep(z, self.schedule.timestep(logsnr), context, w)
