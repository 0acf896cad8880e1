"""A student of a diffusers teacher as a diffusers folder: ``unet/`` loads with ``UNet2DModel.from_pretrained``.

The folder (what ``DDIMPipeline.save_pretrained`` writes, plus ``pd_sampler.json``):

- ``unet/``: config.json + diffusion_pytorch_model.safetensors (the student's weights);
- ``scheduler/``: a DDIMScheduler config with the student's ``prediction_type``, "trailing" spacing,
  ``set_alpha_to_one`` and ``clip_sample`` (our samplers clip x_hat to [-1, 1]); with
  ``use_clipped_model_output=True`` diffusers' own DDIM loop is our sampler when N divides T;
- ``pd_sampler.json``: the N-step grid our sampler walks (:func:`pd_core.export.grid.sampler_grid`):
  the fractional timesteps tau_N .. tau_1 the network sees and (alpha, sigma) at t = N/N .. 0/N,
  the prediction type, the sample shape. Its loop (README, "Distill your own model") is
  x0 = x_hat(out) clipped, eps = (x - alpha_t x0) / sigma_t, x <- alpha_s x0 + sigma_s eps, and
  reproduces ``pd sample`` for any N.

Written to a temporary sibling and renamed, so a failed export leaves nothing half-written; an
existing folder is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pd_core.architecture import DiffusersUNet2D
from pd_core.export.files import ExportError, check_steps, new_output_path
from pd_core.export.grid import sampler_grid
from pd_core.interop.diffusers import require_diffusers, unet_state_dict
from pd_core.interop.diffusers_folder import diffusers_prediction_type
from pd_core.models import LoadedModel

SAMPLER_FILE = "pd_sampler.json"
SAMPLER_FORMAT = "pd-sampler/1"
MAX_STEPS = 4096



def sampler_document(model: LoadedModel, *, steps: int) -> dict:
    """The ``pd_sampler.json`` of ``model`` sampled in ``steps`` steps."""
    arch = model.architecture
    if not isinstance(arch, DiffusersUNet2D):
        raise ExportError("only students of diffusers teachers are UNet2DModels")
    grid = sampler_grid(model.schedule, steps=steps)
    timesteps = [float(v) for v in grid.timestep[1:].flip(0)]  # tau_N .. tau_1: the network's input per step
    alpha_sigma = [[float(a), float(s)] for a, s in zip(grid.alpha.flip(0), grid.sigma.flip(0), strict=True)]
    manifest = model.manifest
    return {
        "format": SAMPLER_FORMAT,
        "steps": steps,
        "prediction_type": diffusers_prediction_type(model.denoiser.parameterization),
        "clip_sample": True,
        "sample_shape": list(arch.image_shape),
        "num_class_embeds": arch.num_classes,
        "timesteps": timesteps,
        "alpha_sigma": alpha_sigma,  # (alpha, sigma) at t = N/N, ..., 1/N, 0/N; the last is (1, 0)
        "num_train_timesteps": arch.schedule.num_timesteps,
        "source": {"kind": manifest.get("kind"), "round": manifest.get("round"), "steps": manifest.get("steps"),
                   "sha256": manifest.get("sha256"), "pipeline": manifest.get("pipeline")},
    }


def export_diffusers(model: LoadedModel, *, out: str, steps: int | None = None) -> Path:
    """Write ``model`` as a diffusers folder at ``out`` (see the module docstring); returns the folder."""
    arch = model.architecture
    if not isinstance(arch, DiffusersUNet2D):
        raise ExportError("this checkpoint is the project's own U-Net, which UNet2DModel cannot load; export it "
                          "with --format onnx (the diffusers format is for students of diffusers teachers)")
    steps = steps or model.steps
    check_steps(model.schedule, steps=steps, most=MAX_STEPS)
    target = new_output_path(out, what="a diffusers folder")
    diffusers = require_diffusers()
    unet = diffusers.UNet2DModel.from_config(arch.config)
    unet.load_state_dict(unet_state_dict({k: v.detach().cpu() for k, v in model.denoiser.net.state_dict().items()}))
    scheduler = diffusers.DDIMScheduler.from_config({
        **arch.scheduler_config, "prediction_type": diffusers_prediction_type(model.denoiser.parameterization),
        "timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0,
        "thresholding": False, "steps_offset": 0})
    document = sampler_document(model, steps=steps)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        diffusers.DDIMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(str(tmp),
                                                                                     safe_serialization=True)
        (tmp / SAMPLER_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
