"""A UNet2DConditionModel as our samplers call it, and stage 1's student: the same UNet plus a guidance embedding.

:class:`TextUNetNet` is ``net(z, logsnr, context, w=None)`` = ``unet(z, tau(lambda), encoder_hidden_states=
context, timestep_cond=phi_d(w)).sample`` over the scheduler's own float32 alpha_bar table (the fractional
timestep tau(lambda) of :class:`~pd_core.schedule.DiscreteSchedule`, so DDIM over it is diffusers'
trailing DDIM). A UNet with ``time_cond_proj_dim`` = d adds W phi_d(w) to its time embedding's input,
with diffusers' guidance-scale embedding of w = guidance_scale - 1 (what ``StableDiffusionPipeline``
feeds it):
    phi_d(w)_k = sin(1000 w f_k),  phi_d(w)_{k + d/2} = cos(1000 w f_k),  f_k = exp(-k ln(10000) / (d/2 - 1)),
k = 0 .. d/2 - 1, a zero appended for odd d. :func:`guided_student_unet` copies a teacher and adds
W = ``time_embedding.cond_proj`` (no bias) at zero, so the student computes the teacher at every w.
:class:`TextUNetCondition` is what a checkpoint's manifest records of such a network;
:class:`CaptionTableNet` indexes a table of caption embeddings by class-label-like indices, and
:class:`CaptionTableArch` is the architecture that builds it (what the class-label jobs train).
diffusers is imported inside the functions that need it (an optional dependency).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pd_core.interop.diffusers import require_diffusers
from pd_core.interop.diffusers_folder import DiffusersImportError
from pd_core.schedule import DiscreteSchedule, schedule_from_dict

COND_PROJ_KEY = "time_embedding.cond_proj.weight"  # the guidance embedding's one new tensor
DEFAULT_GUIDANCE_DIM = 256  # time_cond_proj_dim of diffusers' guidance-embedded UNets (LCM)
EMBEDDING_SCALE = 1000.0  # phi_d embeds 1000 w, as diffusers' get_guidance_scale_embedding
MAX_PERIOD = 10000.0
PREFIX = "unet."  # key prefix of the UNet's tensors inside TextUNetNet's state dict


def guidance_scale_embedding(w: Tensor, *, dim: int) -> Tensor:
    """phi_d(w) (module docstring), (B,) -> (B, d) float32, the same float32 operations as diffusers'
    ``get_guidance_scale_embedding(w, embedding_dim=d)``; pass w = g - 1 for guidance scale g."""
    if w.ndim != 1:
        raise ValueError(f"w must have shape (B,); got {tuple(w.shape)}")
    if dim < 4:
        raise ValueError(f"the guidance embedding needs dim >= 4; got {dim}")
    half = dim // 2
    scaled = w * EMBEDDING_SCALE
    step = torch.log(torch.tensor(MAX_PERIOD)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    angles = scaled.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_scale_embedding_f64(w: float, *, dim: int) -> Tensor:
    """phi_d(w) in float64 from the formula alone (a reference for :func:`guidance_scale_embedding`)."""
    half = dim // 2
    f = [math.exp(-k * math.log(MAX_PERIOD) / (half - 1)) for k in range(half)]
    row = [math.sin(EMBEDDING_SCALE * w * fk) for fk in f] + [math.cos(EMBEDDING_SCALE * w * fk) for fk in f]
    return torch.tensor(row + [0.0] * (dim % 2), dtype=torch.float64)


def load_strict(module: nn.Module, tensors: dict[str, Tensor], *, component: str) -> nn.Module:
    """``module`` with ``tensors`` loaded, every tensor fitting (DiffusersImportError naming the component)."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise DiffusersImportError(f"{component}: the weights do not fit its config (missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(unexpected)[:3]}); save the pipeline with save_pretrained")
    return module.eval()


def build_cond_unet(config: dict, weights: dict[str, Tensor] | None = None) -> nn.Module:
    """The UNet2DConditionModel of ``config``, with ``weights`` loaded (strictly) when given."""
    unet = require_diffusers().UNet2DConditionModel.from_config(config)
    return unet if weights is None else load_strict(unet, weights, component="unet")


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


TEXT_UNET_KEY = "diffusers_unet2d_condition"  # manifest field of a UNet2DConditionModel's config
SCHEDULER_KEY = "diffusers_scheduler"  # manifest field of the scheduler config it came with


@functools.lru_cache(maxsize=16)
def _state_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing drawn from the RNG
        unet = require_diffusers().UNet2DConditionModel.from_config(json.loads(config_json))
    return {PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}


@dataclass(frozen=True)
class TextUNetCondition:
    """A checkpoint's UNet2DConditionModel (config as canonical JSON) run on its training table's timesteps.

    The network is :class:`TextUNetNet` (``net(z, logsnr, context[, w])``; its state dict holds the UNet's
    tensors under ``unet.``); ``image_shape`` is the latent shape it denoises.
    """

    config_json: str
    schedule: DiscreteSchedule
    scheduler_config_json: str = "{}"

    @classmethod
    def of(cls, unet_config: dict, *, schedule: DiscreteSchedule, scheduler_config: dict | None = None
           ) -> TextUNetCondition:
        public = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        return cls(config_json=json.dumps(public, sort_keys=True), schedule=schedule,
                   scheduler_config_json=json.dumps(scheduler_config or {}, sort_keys=True))

    @classmethod
    def from_manifest(cls, manifest: dict) -> TextUNetCondition:
        schedule = schedule_from_dict(manifest.get("schedule"))
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError("a UNet2DConditionModel checkpoint must record its discrete schedule (manifest field "
                             "'schedule' with kind 'discrete')")
        return cls.of(manifest[TEXT_UNET_KEY], schedule=schedule, scheduler_config=manifest.get(SCHEDULER_KEY))

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    @property
    def scheduler_config(self) -> dict:
        return json.loads(self.scheduler_config_json)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (int(c.get("in_channels", 4)), int(c["sample_size"]), int(c["sample_size"]))

    @property
    def num_classes(self) -> int:
        return 0  # conditioned on prompt embeddings, not class labels

    @property
    def null_class(self) -> bool:
        return False

    @property
    def guidance_embedding(self) -> bool:
        return self.config.get("time_cond_proj_dim") is not None

    @property
    def out_channels(self) -> int:
        return int(self.config.get("out_channels", 4))

    def build(self, *, dropout: float) -> nn.Module:
        """A fresh TextUNetNet; a guidance embedding's W starts at zero (the stage-1 student starts as its teacher)."""
        unet = build_cond_unet({**self.config, "dropout": float(dropout)})
        if self.guidance_embedding:
            with torch.no_grad():
                unet.time_embedding.cond_proj.weight.zero_()
        return TextUNetNet(unet, schedule=self.schedule)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return _state_shapes(self.config_json)

    def manifest_fields(self) -> dict:
        return {"unet": None, TEXT_UNET_KEY: self.config, SCHEDULER_KEY: self.scheduler_config}

    def without_dropout(self) -> TextUNetCondition:
        return TextUNetCondition.of({**self.config, "dropout": 0.0}, schedule=self.schedule,
                                    scheduler_config=self.scheduler_config)

    def with_guidance_embedding(self, dim: int = DEFAULT_GUIDANCE_DIM) -> TextUNetCondition:
        """Stage 1's student architecture: the same UNet with ``time_cond_proj_dim = dim``."""
        return TextUNetCondition.of({**self.config, "time_cond_proj_dim": dim}, schedule=self.schedule,
                                    scheduler_config=self.scheduler_config)


class CaptionTableNet(TextUNetNet):
    """net(z, logsnr, y[, w]) = text_net(z, logsnr, table[y][, w]): caption indices as class labels.

    ``table`` (U + 1, L, D) holds the U distinct captions' embeddings and, as row U, the empty
    prompt's, so index U is the null class of classifier-free guidance and the class-label
    machinery (:class:`pd_core.guidance.GuidedDenoiser`, label dropout, the rounds) drives a
    text-conditioned UNet unchanged. The table is data, not weights: a non-persistent buffer, so the
    state dict is the TextUNetNet's (the UNet's tensors under ``unet.``) and checkpoints are the same.
    """

    def __init__(self, text_net: TextUNetNet, *, caption_embeds: Tensor, null_embed: Tensor):
        super().__init__(text_net.unet, schedule=text_net.schedule)
        if caption_embeds.ndim != 3 or null_embed.shape != (1, *caption_embeds.shape[1:]):
            raise ValueError(f"caption_embeds (U, L, D) and null_embed (1, L, D) must agree; got "
                             f"{tuple(caption_embeds.shape)} and {tuple(null_embed.shape)}")
        self.register_buffer("table", torch.cat([caption_embeds, null_embed]), persistent=False)

    @property
    def null_label(self) -> int:
        """The index of the empty prompt (U)."""
        return self.table.shape[0] - 1

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
        return super().forward(z, logsnr, self.table[y].to(z.dtype), w)


@dataclass(frozen=True, eq=False)
class CaptionTableArch:
    """A :class:`TextUNetCondition` over a caption table: the architecture the class-label jobs train and check.

    ``num_classes`` is the number of distinct captions U and the null class U is the empty prompt
    (:class:`CaptionTableNet`); the manifest fields, state shapes and weights are the inner
    architecture's, so a checkpoint never holds the table.
    """

    inner: TextUNetCondition
    caption_embeds: Tensor
    null_embed: Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.inner.image_shape

    @property
    def num_classes(self) -> int:
        return int(self.caption_embeds.shape[0])

    @property
    def null_class(self) -> bool:
        return True

    @property
    def guidance_embedding(self) -> bool:
        return self.inner.guidance_embedding

    @property
    def out_channels(self) -> int:
        return self.inner.out_channels

    @property
    def schedule(self) -> DiscreteSchedule:
        return self.inner.schedule

    def build(self, *, dropout: float) -> nn.Module:
        return CaptionTableNet(self.inner.build(dropout=dropout), caption_embeds=self.caption_embeds,
                               null_embed=self.null_embed)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.inner.state_shapes()

    def manifest_fields(self) -> dict:
        return self.inner.manifest_fields()

    def without_dropout(self) -> CaptionTableArch:
        return CaptionTableArch(self.inner.without_dropout(), self.caption_embeds, self.null_embed)

    def with_guidance_embedding(self, dim: int = DEFAULT_GUIDANCE_DIM) -> CaptionTableArch:
        return CaptionTableArch(self.inner.with_guidance_embedding(dim), self.caption_embeds, self.null_embed)
