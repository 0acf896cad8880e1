"""Classifier-free guidance of a text-conditioned latent model and stage 1 of its distillation
(Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023, latent-space text-to-image).

The model denoises VAE latents x (the latent distribution's sample times the VAE's ``scaling_factor``),
z_t = alpha_t x + sigma_t eps, conditioned on a prompt embedding c (the text encoder's last hidden
state, (B, L, D)); the empty prompt "" embeds to c_0. At guidance weight w >= 0 the guided model is
    eps_hat_w(z_t, c) = (1 + w) eps_hat(z_t, c) - w eps_hat(z_t, c_0)
    x_hat_w(z_t, c)   = (1 + w) x_hat(z_t, c)   - w x_hat(z_t, c_0)
(both hold together: eps_hat = (z_t - alpha_t x_hat) / sigma_t is affine in x_hat with coefficients
summing to one). In diffusers' terms the guidance scale is g = 1 + w: ``StableDiffusionPipeline``
computes eps_u + g (eps_c - eps_u), the same number. Two network calls, made as one on the doubled
batch [(z_t, c), (z_t, c_0)] (:class:`TextGuidedDenoiser`).

Stage 1: a student eps_eta(z_t, c, w) is the teacher's UNet2DConditionModel plus diffusers' guidance
embedding (``time_cond_proj_dim`` = d): the time embedding's input gains W_w phi_d(w), where
    phi_d(w)_k = sin(1000 w f_k),  phi_d(w)_{k + d/2} = cos(1000 w f_k),  f_k = exp(-k ln(10000) / (d/2 - 1)),
k = 0 .. d/2 - 1 (a zero appended for odd d), exactly what ``StableDiffusionPipeline`` feeds such a
UNet as ``timestep_cond`` for guidance scale g (it embeds g - 1 = w;
:func:`pd_core.interop.sd_unet.guidance_scale_embedding`).
W_w (``time_embedding.cond_proj``, no bias) starts at zero, so the student starts as the teacher's
conditional model at every w. It learns
    min_eta E_{(x, c), t ~ U[1/T, 1), w ~ U[w_min, w_max], eps}
        weight(lambda_t) ||x_hat_eta(z_t, c, w) - x_hat_w(z_t, c)||^2
(t from the first training timestep 1/T of the discrete teacher on) with the teacher's two calls
without gradients (:func:`stage1_target`); one student call then replaces two, and a pipeline of it
runs as stock ``StableDiffusionPipeline`` (one UNet call a step). ``pd run`` trains this objective as
:class:`pd_core.guidance.GuidanceLoss` over :class:`~pd_core.interop.sd_unet.CaptionTableArch`
(caption indices into the table of embeddings, the empty prompt its null class);
:class:`TextGuidanceLoss` is the same objective over prompt embeddings passed directly, for a caller
that holds embeddings rather than a caption table; the pipeline does not use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core._checks import broadcast_to, check_image_batch
from pd_core.denoiser import Denoiser
from pd_core.guidance import guided_forward, sample_guidance
from pd_core.schedule import DiscreteSchedule, alpha_sigma
from pd_core.weighting import check_combination, per_example_loss


def _weights(w: Tensor | float, *, batch: int, like: Tensor) -> Tensor:
    w = torch.as_tensor(w, dtype=torch.float64, device=like.device)
    if w.ndim == 0:
        w = w.expand(batch)
    if w.shape != (batch,) or not bool((w >= 0).all()):
        raise ValueError(f"guidance weights must be >= 0, one per example ({batch}); got {tuple(w.shape)}")
    return w


class TextGuidedDenoiser:
    """The guided model x_hat_w, eps_hat_w (module docstring) of a text-conditioned denoiser.

    ``conditional`` is a :class:`Denoiser` over a net ``net(z, logsnr, context)`` (its own bound
    context is ignored); ``context`` (B, L, D) the prompt embeddings, ``null_context`` the empty
    prompt's, (1, L, D) or (B, L, D); ``w`` (B,) or a float. One network call on 2B examples.
    """

    def __init__(self, conditional: Denoiser, *, context: Tensor, null_context: Tensor, w: Tensor | float):
        if context.ndim != 3 or null_context.ndim != 3 or null_context.shape[1:] != context.shape[1:]:
            raise ValueError(f"context (B, L, D) and null_context (1 or B, L, D) must agree; got "
                             f"{tuple(context.shape)} and {tuple(null_context.shape)}")
        b = context.shape[0]
        self.batch = b
        self.w = _weights(w, batch=b, like=context)
        both = torch.cat([context, null_context.expand(b, *context.shape[1:])])  # (2B, L, D)
        self._both = conditional.with_labels(both)

    def __call__(self, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        b = z.shape[0]
        if b != self.batch:
            raise ValueError(f"z has {b} examples but {self.batch} prompt embeddings are bound")
        return guided_forward(self._both, z=z, logsnr=logsnr, w=self.w)


@torch.no_grad()
def stage1_target(teacher: Denoiser, *, z: Tensor, logsnr: Tensor, context: Tensor, null_context: Tensor,
                  w: Tensor | float) -> tuple[Tensor, Tensor]:
    """(x_hat_w, eps_hat_w)(z_t, c) of the frozen teacher: what the stage-1 student learns at (z_t, c, w)."""
    return TextGuidedDenoiser(teacher, context=context, null_context=null_context, w=w)(z, logsnr)


def student_denoiser(student: Denoiser, *, context: Tensor, w: Tensor | float) -> Denoiser:
    """The stage-1 student at prompts ``context`` and weights ``w``: one call of ``net(z, logsnr, context, w)``."""
    return student.with_labels(context).with_guidance(_weights(w, batch=context.shape[0], like=context).float())


class TextGuidanceLoss:
    """Stage 1 (module docstring): per-example weight(lambda_t) ||x_hat_student(z_t, c, w) - x_hat_w(z_t, c)||^2 over
    prompt embeddings given directly (not used by ``pd run``, whose stage 1 is GuidanceLoss over the caption table).

    ``teacher`` is a Denoiser over the frozen text-conditioned teacher net; the student a Denoiser
    over the same UNet plus the guidance embedding. t ~ U[1/T, 1) on the teacher's discrete schedule
    (t < 1/T lies between the clean end and the first training timestep), eps ~ N(0, I),
    w ~ U[w_min, w_max], drawn in that order. No clipping.
    """

    def __init__(self, teacher: Denoiser, *, w_min: float, w_max: float, weighting: str, schedule: DiscreteSchedule):
        if not 0.0 <= w_min <= w_max:
            raise ValueError(f"guidance weights need 0 <= w_min <= w_max; got {w_min}, {w_max}")
        self.teacher = teacher
        self.w_min, self.w_max = w_min, w_max
        self.weighting = weighting
        self.schedule = schedule

    def targets(self, x: Tensor, context: Tensor, null_context: Tensor, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(z_t, lambda_t, w, x_hat_w(z_t, c)) for latents ``x`` (B, C, h, w) and prompt embeddings ``context``."""
        check_image_batch("x", x)
        b = x.shape[0]
        first = 1.0 / self.schedule.num_timesteps
        u = torch.rand(b, device=x.device, dtype=torch.float64, generator=generator)
        t = first + (1.0 - first) * u  # (B,) in [1/T, 1)
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        w = sample_guidance(b, w_min=self.w_min, w_max=self.w_max, generator=generator, device=x.device,
                            dtype=x.dtype)
        lam = self.schedule.logsnr(t).to(x.dtype)
        alpha, sigma = (broadcast_to(v, x) for v in alpha_sigma(lam))
        z = alpha * x + sigma * eps
        x_w, _ = stage1_target(self.teacher, z=z, logsnr=lam, context=context, null_context=null_context, w=w)
        return z, lam, w, x_w

    def __call__(self, student: Denoiser, x: Tensor, context: Tensor, null_context: Tensor, *,
                 generator: torch.Generator | None = None) -> Tensor:
        check_combination(parameterization=student.parameterization, weighting=self.weighting)
        z, lam, w, x_w = self.targets(x, context, null_context, generator=generator)
        x_hat, _ = student_denoiser(student, context=context, w=w)(z, lam)
        return per_example_loss(x_hat=x_hat.float(), x=x_w.float(), logsnr=lam.float(), kind=self.weighting)
