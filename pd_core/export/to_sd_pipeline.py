"""A distilled text-to-image student as a complete ``StableDiffusionPipeline`` folder that stock diffusers runs.

The folder (what ``StableDiffusionPipeline.save_pretrained`` writes, plus ``pd_sampler.json``):

- ``unet/``: the student's UNet2DConditionModel; a guided student has ``time_cond_proj_dim``, so
  ``StableDiffusionPipeline`` feeds it phi_d(guidance_scale - 1) and calls it ONCE per step;
- ``vae/``, ``text_encoder/``, ``tokenizer/``: the teacher's, unchanged;
- ``scheduler/``: a DDIMScheduler of the teacher's beta table with the student's ``prediction_type``,
  "trailing" spacing, ``set_alpha_to_one``, no sample clipping and no thresholding. With N dividing
  T its timesteps are i T / N - 1 (i = N .. 1), exactly the timesteps tau(lambda(i / N)) our
  sampler feeds the network, and its step from alpha_bar_t to alpha_bar_{t - T/N} (1 at the end) is
  our DDIM step, so ``pipe(prompt, num_inference_steps=N, guidance_scale=1 + w)`` is our N-step
  sampler at weight w (``steps_offset`` only moves "leading" spacing; it is 1 as the pipeline wants);
- ``pd_sampler.json``: the step count N the student was distilled for, its prediction type, the
  guidance embedding's width and where the weights came from (another N runs, but is not what was
  distilled).

Written to a temporary sibling and renamed, so a failed export leaves nothing half-written; an
existing folder is never overwritten.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from pd_core.export.files import ExportError, check_steps, new_output_path
from pd_core.interop.diffusers import require_diffusers
from pd_core.interop.diffusers_folder import diffusers_prediction_type
from pd_core.interop.sd_pipeline import TextToImageModel, build_text_encoder, build_tokenizer, build_vae
from pd_core.interop.sd_unet import TextUNetNet

SAMPLER_FILE = "pd_sampler.json"
CARD_FILE = "README.md"
SAMPLER_FORMAT = "pd-text-to-image/1"
MAX_STEPS = 1024


def student_scheduler_config(teacher: TextToImageModel, *, parameterization: str) -> dict:
    """The DDIMScheduler config that reproduces our N-step sampler for a student of ``parameterization``."""
    return {**teacher.configs["scheduler"], "prediction_type": diffusers_prediction_type(parameterization),
            "timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False, "thresholding": False,
            "steps_offset": 1, "rescale_betas_zero_snr": False}


def example_w(manifest: dict) -> float:
    """The guidance weight an export's usage line and model card show: 2 clamped into the student's trained range
    [w_min, w_max] (its manifest; 2 when it records none)."""
    w_min, w_max = manifest.get("w_min"), manifest.get("w_max")
    w = 2.0 if w_max is None else min(2.0, float(w_max))
    return w if w_min is None else max(w, float(w_min))


def check_export_steps(teacher: TextToImageModel, *, steps: int) -> None:
    """ExportError unless N divides the T training timesteps (trailing DDIMScheduler rounds otherwise)."""
    check_steps(teacher.schedule, steps=steps, most=MAX_STEPS)
    t = teacher.schedule.num_timesteps
    if t % steps:
        raise ExportError(f"--steps {steps} does not divide the scheduler's {t} timesteps, so DDIMScheduler's "
                          f"trailing timesteps would be rounded away from the ones the student was distilled on; "
                          f"export a step count that divides {t}")


def export_text_to_image(*, student_unet: nn.Module, parameterization: str, teacher: TextToImageModel, steps: int,
                         out: str, source: dict | None = None, w: float = 2.0) -> Path:
    """Write the student as a StableDiffusionPipeline folder at ``out`` (module docstring); returns it. ``w``: the
    guidance weight the model card's example uses (inside the student's trained range, :func:`example_w`)."""
    check_export_steps(teacher, steps=steps)
    target = new_output_path(out, what="a diffusers pipeline folder")
    diffusers = require_diffusers()
    scheduler = diffusers.DDIMScheduler.from_config(student_scheduler_config(teacher,
                                                                             parameterization=parameterization))
    document = {"format": SAMPLER_FORMAT, "steps": steps,
                "prediction_type": diffusers_prediction_type(parameterization),
                "time_cond_proj_dim": student_unet.config.time_cond_proj_dim,
                "guidance": "guidance_scale = 1 + w, one UNet call per step" if student_unet.config.time_cond_proj_dim
                else "classifier-free guidance by the pipeline (two UNet calls per step when guidance_scale > 1)",
                "teacher": {"source": teacher.source, "sha256": teacher.source_sha256}, "source": source or {},
                "example_w": w}
    pipe = diffusers.StableDiffusionPipeline(
        unet=copy.deepcopy(student_unet).float().eval(), vae=build_vae(teacher),
        text_encoder=build_text_encoder(teacher), tokenizer=build_tokenizer(teacher), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / SAMPLER_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(model_card(target=target, steps=steps, document=document), encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_student_checkpoint(loaded, *, teacher: TextToImageModel, out: str, steps: int | None = None) -> Path:
    """:func:`export_text_to_image` of a stored student (a :class:`~pd_core.models.LoadedModel` whose network is
    a :class:`~pd_core.interop.sd_unet.TextUNetNet`), at its own step count unless ``steps`` is given."""
    net = loaded.denoiser.net
    if not isinstance(net, TextUNetNet):
        raise ExportError("this checkpoint is not a text-to-image UNet2DConditionModel; only students of "
                          "text-to-image teachers export as a StableDiffusionPipeline folder")
    manifest = loaded.manifest
    return export_text_to_image(student_unet=net.unet, parameterization=loaded.denoiser.parameterization,
                                teacher=teacher, steps=steps or loaded.steps, out=out, w=example_w(manifest),
                                source={k: manifest.get(k) for k in ("kind", "round", "steps", "sha256", "pipeline")})


def model_card(*, target: Path, steps: int, document: dict) -> str:
    """The folder's README.md: what it is, the step count N it was distilled for and the exact stock call."""
    guided = document["time_cond_proj_dim"] is not None
    w = float(document.get("example_w", 2.0)) if guided else 0.0
    call = usage_line(out=target, steps=steps, w=w)
    how = " with guided distillation (Meng et al. 2023)" if guided else ""
    return (f"# A {steps}-step distilled text-to-image pipeline\n\n"
            f"Progressive distillation (Salimans & Ho 2022){how}"
            f" of the teacher at `{document['teacher']['source']}` (sha256 {document['teacher']['sha256'][:12]}).\n\n"
            f"- Distilled for **{steps} sampling step(s)**: call it with `num_inference_steps={steps}`; other step "
            f"counts run but are not what it was trained for.\n"
            f"- Scheduler: DDIM, trailing spacing, `prediction_type={document['prediction_type']}`, no clipping.\n"
            f"- Guidance: {document['guidance']}.\n\n"
            f"```python\nfrom diffusers import StableDiffusionPipeline\n\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({str(target)!r}, safety_checker=None, "
            f"requires_safety_checker=False)\n"
            f"image = pipe(\"a photo of a sneaker\", num_inference_steps={steps}"
            f", guidance_scale={1.0 + w:g}).images[0]\n```\n\n`{call}`\n")


def usage_line(*, out: Path, steps: int, w: float | None) -> str:
    """The stock-diffusers line printed after an export."""
    scale = "" if w is None else f", guidance_scale={1.0 + w:g}"
    return (f"StableDiffusionPipeline.from_pretrained({str(out)!r})(prompt, num_inference_steps={steps}{scale})"
            f"  # one UNet call per step")
