"""The ``diffusers_ddim`` baseline: what ``DDIMPipeline.from_pretrained(folder)(num_inference_steps=N)`` does.

``DDIMPipeline`` rebuilds any scheduler as ``DDIMScheduler.from_config(folder's config)``, so the
folder's own ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample``,
``clip_sample_range``, ``thresholding`` and ``prediction_type`` decide the loop. With the call's
defaults (eta = 0, ``use_clipped_model_output=None``) step k at timestep t_k, previous timestep
p_k = t_k - T // N (alpha_bar_{p_k}, or ``final_alpha_cumprod`` when p_k < 0) is

    x0 = x_hat(model output at t_k)  [clipped to +-clip_sample_range, or thresholded]
    e  = the model's eps (re-derived from the unclipped x0 for v / sample prediction)
    z  <- sqrt(alpha_bar_{p_k}) x0 + sqrt(1 - alpha_bar_{p_k}) e

and the pipeline returns (z / 2 + 1 / 2).clamp(0, 1). :func:`folder_ddim` runs exactly that loop on
given noise and returns z (the [-1, 1] image before the pipeline's clamp), so a caller compares it
with our samplers on the same noise. diffusers is imported inside the functions (optional).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pd_core.interop.diffusers import require_diffusers


def folder_ddim_scheduler(scheduler_config: dict):
    """``DDIMScheduler.from_config(scheduler_config)``: what ``DDIMPipeline.__init__`` makes of a folder's scheduler."""
    return require_diffusers().DDIMScheduler.from_config(dict(scheduler_config))


@torch.no_grad()
def folder_ddim(unet: nn.Module, scheduler_config: dict, noise: Tensor, *, steps: int,
                class_labels: Tensor | None = None) -> Tensor:
    """``DDIMPipeline``'s loop with its default call arguments over ``unet`` and the folder's scheduler config.

    ``class_labels`` reaches a class-conditional UNet2DModel (the stock pipeline passes none).
    """
    scheduler = folder_ddim_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    z = noise.clone()
    for t in scheduler.timesteps:
        out = unet(z, t, class_labels=class_labels).sample
        z = scheduler.step(out, t, z, eta=0.0, use_clipped_model_output=None).prev_sample
    return z
