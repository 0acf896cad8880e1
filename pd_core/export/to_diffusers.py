"""A student of a diffusers teacher as a diffusers folder the stock ``DDIMPipeline`` samples like ``pd sample``.

The folder (what ``DDIMPipeline.save_pretrained`` writes, plus ``pd_sampler.json`` and ``README.md``):

- ``unet/``: config.json + diffusion_pytorch_model.safetensors (the student's weights);
- ``scheduler/``: a DDIMScheduler config with the student's ``prediction_type``, "trailing" spacing,
  ``set_alpha_to_one``, ``clip_sample`` (range 1) and no thresholding. Our DDIM over a discrete
  schedule (``samplers.ddim``) is that scheduler's step at every N (integer trailing timesteps, the
  previous timestep tau - T // N, x0 clipped, the model's eps kept), so
  ``DDIMPipeline.from_pretrained(folder)(num_inference_steps=N)`` with its default call arguments
  (eta 0, ``use_clipped_model_output`` off) is ``pd sample`` on the same noise;
- ``pd_sampler.json``: that grid written out (:func:`pd_core.export.grid.sampler_grid`): the integer
  timesteps tau_N .. tau_1 the network sees, (alpha, sigma) there and where each step lands, the
  clipping, the prediction type, the sample shape, the source checkpoint;
- ``README.md``: the model card (:func:`model_card`): N and the exact call.

Written to a temporary sibling and renamed, so a failed export leaves nothing half-written; an
existing folder is never overwritten; the result is readable by others (:func:`files.publish`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pd_core.architecture import DiffusersUNet2D
from pd_core.export.files import ExportError, check_steps, new_output_path, publish
from pd_core.export.grid import sampler_grid
from pd_core.interop.diffusers import require_diffusers, unet_state_dict
from pd_core.interop.diffusers_folder import diffusers_prediction_type
from pd_core.models import LoadedModel

SAMPLER_FILE = "pd_sampler.json"
SAMPLER_FORMAT = "pd-sampler/2"
CARD_FILE = "README.md"
MAX_STEPS = 4096



def sampler_document(model: LoadedModel, *, steps: int) -> dict:
    """The ``pd_sampler.json`` of ``model`` sampled in ``steps`` steps."""
    arch = model.architecture
    if not isinstance(arch, DiffusersUNet2D):
        raise ExportError("only students of diffusers teachers are UNet2DModels")
    grid = sampler_grid(model.schedule, steps=steps)
    manifest = model.manifest
    return {
        "format": SAMPLER_FORMAT,
        "steps": steps,
        "prediction_type": diffusers_prediction_type(model.denoiser.parameterization),
        "clip_sample": True,  # x0 clipped to [-1, 1] ...
        "use_clipped_model_output": False,  # ... and the model's eps kept: DDIMPipeline's defaults
        "sample_shape": list(arch.image_shape),
        "num_class_embeds": arch.num_classes,
        "timesteps": [int(v) for v in grid.timestep[1:].flip(0)],  # tau_N .. tau_1: the network's input per step
        "alpha_sigma": [[float(a), float(s)] for a, s in zip(grid.alpha[1:].flip(0), grid.sigma[1:].flip(0),
                                                             strict=True)],  # at tau_N .. tau_1
        "step_to": [[float(a), float(s)] for a, s in zip(grid.dest_alpha.flip(0), grid.dest_sigma.flip(0),
                                                         strict=True)],  # where each step lands; (1, 0): x0
        "num_train_timesteps": arch.schedule.num_timesteps,
        "source": {"kind": manifest.get("kind"), "round": manifest.get("round"), "steps": manifest.get("steps"),
                   "sha256": manifest.get("sha256"), "pipeline": manifest.get("pipeline")},
    }


def model_card(model: LoadedModel, *, steps: int, folder: str) -> str:
    """The export's README.md: what the model is, N, and the exact stock call that reproduces ``pd sample``."""
    manifest = model.manifest
    source = f"{manifest.get('kind', 'checkpoint')} of pipeline {manifest.get('pipeline')!r}, round " \
             f"{manifest.get('round')}, sha256 {manifest.get('sha256')}"
    conditional = model.num_classes > 0
    call = (f'pipe = DDIMPipeline.from_pretrained("{folder}")\n'
            f"images = pipe(num_inference_steps={steps}).images  # PIL images\n"
            f"# pd sample --seed 0 --num 16 draws the same noise:\n"
            f"same = pipe(batch_size=16, generator=torch.Generator().manual_seed(0), num_inference_steps={steps},\n"
            f'            output_type="np").images')
    lines = [
        "---", "library_name: diffusers", "tags: [progressive-distillation, ddim, unconditional-image-generation]",
        "---", "", f"# A {steps}-step sampler distilled by progressive distillation", "",
        f"A `UNet2DModel` ({model.denoiser.parameterization} prediction, {model.image_shape[0]}x"
        f"{model.image_shape[1]}x{model.image_shape[2]} images) distilled to sample in **{steps} DDIM "
        f"step{'s' if steps > 1 else ''}**. Source: {source}.", "",
        f"Run it with `num_inference_steps={steps}` (the pipeline's default of 50 steps runs a {steps}-step "
        f"student far outside what it was distilled for):", "",
        "```python", "import torch", "from diffusers import DDIMPipeline", "", call, "```", "",
        "The scheduler is `DDIMScheduler` with trailing spacing, `set_alpha_to_one` and `clip_sample`; with its "
        "default call arguments (eta 0, `use_clipped_model_output` off) this is the project's `pd sample` to "
        "1e-4 on the same noise. `pd_sampler.json` lists the timesteps and coefficients of the grid.",
    ]
    if conditional:
        lines += ["", f"Class-conditional ({model.num_classes} classes): `DDIMPipeline` passes no labels, so "
                  f"call the loop yourself with `unet(x, t, class_labels=y).sample` and "
                  f"`scheduler.step(out, t, x).prev_sample` over `scheduler.set_timesteps({steps})`."]
    return "\n".join(lines) + "\n"


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
        (tmp / CARD_FILE).write_text(model_card(model, steps=steps, folder=str(target)), encoding="utf-8")
        publish(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
