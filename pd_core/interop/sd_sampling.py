"""Text-to-image sampling: prompts -> prompt embeddings -> N-step DDIM over latents -> VAE decode -> images.

The denoiser per model and guidance weight w >= 0 (:func:`prompt_denoiser`):
- a guided student (UNet with ``time_cond_proj_dim``): one UNet call a step, fed phi_d(w);
- a teacher at w = 0: the conditional model, one call a step;
- a teacher at w > 0: eps_hat_w = (1 + w) eps_hat(z, c) - w eps_hat(z, c_0), one call on the doubled
  batch (two a step), which is ``StableDiffusionPipeline`` at ``guidance_scale = 1 + w``.
DDIM walks our grid without clipping (latents are not in [-1, 1]); x_hat at the last step are the
latents. Decoding is the pipeline's: images = vae.decode(latents / scaling_factor), clamped to
[-1, 1] (diffusers' postprocess clamps (x / 2 + 0.5) to [0, 1], the same pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pd_core.denoiser import Denoiser, DenoiserFn
from pd_core.interop.sd_pipeline import (
    TextToImageModel,
    build_text_encoder,
    build_tokenizer,
    build_vae,
    encode_prompts,
)
from pd_core.interop.sd_unet import TextUNetNet, build_cond_unet
from pd_core.samplers import ddim
from pd_core.schedule import DiscreteSchedule
from pd_core.text_guidance import TextGuidedDenoiser, student_denoiser


@dataclass(frozen=True)
class PromptSampler:
    """The modules a text-to-image sample needs: the UNet as a net over the schedule, VAE, tokenizer, encoder."""

    net: TextUNetNet
    parameterization: str
    vae: nn.Module
    tokenizer: object
    text_encoder: nn.Module
    scaling_factor: float

    @classmethod
    def of(cls, model: TextToImageModel, *, unet: nn.Module | None = None,
           parameterization: str | None = None) -> PromptSampler:
        """The teacher's modules, with a student's ``unet`` and ``parameterization`` in place of its own if given."""
        unet = unet if unet is not None else build_cond_unet(model.configs["unet"], model.weights["unet"])
        return cls(net=TextUNetNet(unet.eval(), schedule=model.schedule),
                   parameterization=parameterization or model.parameterization, vae=build_vae(model),
                   tokenizer=build_tokenizer(model), text_encoder=build_text_encoder(model),
                   scaling_factor=model.scaling_factor)

    @property
    def schedule(self) -> DiscreteSchedule:
        return self.net.schedule

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.net.unet.config
        return (int(c.in_channels), int(c.sample_size), int(c.sample_size))

    def to(self, dtype: torch.dtype) -> PromptSampler:
        """Every module in ``dtype`` (float64 for references)."""
        for module in (self.net, self.vae, self.text_encoder):
            module.to(dtype)
        return self


def prompt_denoiser(sampler: PromptSampler, *, context: Tensor, null_context: Tensor, w: float) -> DenoiserFn:
    """The denoiser of the module docstring for prompt embeddings ``context`` (B, L, D) at weight ``w``."""
    if not w >= 0:
        raise ValueError(f"guidance weight w must be >= 0; got {w}")
    denoiser = Denoiser(sampler.net, parameterization=sampler.parameterization)
    if sampler.net.guidance_dim is not None:
        return student_denoiser(denoiser, context=context, w=w)
    if w == 0:
        return denoiser.with_labels(context)
    return TextGuidedDenoiser(denoiser, context=context, null_context=null_context, w=w)


@torch.no_grad()
def sample_latents(sampler: PromptSampler, *, prompts: list[str], w: float, steps: int, noise: Tensor) -> Tensor:
    """N-step DDIM latents (B, C, h, w) for ``prompts`` from ``noise`` (B, C, h, w), no clipping."""
    if noise.shape[0] != len(prompts) or tuple(noise.shape[1:]) != sampler.latent_shape:
        raise ValueError(f"noise must have shape ({len(prompts)}, {', '.join(map(str, sampler.latent_shape))}); "
                         f"got {tuple(noise.shape)}")
    context = encode_prompts(sampler.tokenizer, sampler.text_encoder, prompts).to(noise.dtype)
    two_calls = w > 0 and sampler.net.guidance_dim is None
    null = encode_prompts(sampler.tokenizer, sampler.text_encoder, [""]).to(noise.dtype) if two_calls else context[:1]
    denoiser = prompt_denoiser(sampler, context=context, null_context=null, w=w)
    return ddim(denoiser, noise, num_steps=steps, clip=False, schedule=sampler.schedule)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor, *, scaling_factor: float) -> Tensor:
    """Images in [-1, 1] (B, 3, H, W): vae.decode(latents / scaling_factor), clamped."""
    return vae.decode(latents / scaling_factor).sample.clamp(-1.0, 1.0)


def sample_images(sampler: PromptSampler, *, prompts: list[str], w: float, steps: int, noise: Tensor) -> Tensor:
    """Images in [-1, 1] for ``prompts``: :func:`sample_latents` then :func:`decode_latents`."""
    latents = sample_latents(sampler, prompts=prompts, w=w, steps=steps, noise=noise)
    return decode_latents(sampler.vae, latents, scaling_factor=sampler.scaling_factor)


def prompt_grid(sampler: PromptSampler, *, prompts: list[str], per_prompt: int, w: float, steps: int,
                seed: int, batch_size: int | None = None) -> tuple[Tensor, str]:
    """Images (on the CPU) for a grid with one row per prompt (``per_prompt`` samples each) and its caption naming
    the step count, w and each row's prompt; pass ``nrow=per_prompt`` to the grid writer.

    The noise is drawn on the CPU from ``seed`` (the same latents on every device) and moved to the UNet's device;
    the UNet and the VAE run on ``batch_size`` samples at a time (default: all), which changes no sample."""
    if not prompts or per_prompt < 1:
        raise ValueError(f"need at least one prompt and per_prompt >= 1; got {len(prompts)} and {per_prompt}")
    rows = [p for p in prompts for _ in range(per_prompt)]
    param = next(sampler.net.parameters())
    noise = torch.randn((len(rows), *sampler.latent_shape), generator=torch.Generator().manual_seed(seed),
                        dtype=param.dtype)
    step = max(1, batch_size or len(rows))
    images = torch.cat([sample_images(sampler, prompts=rows[i:i + step], w=w, steps=steps,
                                      noise=noise[i:i + step].to(param.device)).float().cpu()
                        for i in range(0, len(rows), step)])
    named = "; ".join(f"row {i + 1} '{p}'" for i, p in enumerate(prompts))
    caption = f"{steps} step{'' if steps == 1 else 's'}, w = {w:g}: {named}"
    return images, caption
