"""``pd export``: a checkpoint's (or a registered MLflow model's) few-step sampler as a diffusers folder or ONNX."""

from __future__ import annotations

import torch

from flows.sampling import load_any_model
from pd_core import text_to_image
from pd_core.export.files import ExportError
from pd_core.interop.sd_unet import TextUNetCondition
from tasks.env import prepare_environment

FORMATS = ("diffusers", "onnx")


def export_model(*, model: str, fmt: str, out: str, steps: int | None = None,
                 tracking_uri: str | None = None) -> str:
    """Export ``model`` (checkpoint folder URI or models:/NAME@ALIAS) to ``out``; returns a one-line summary."""
    prepare_environment()
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    loaded = load_any_model(model, device=torch.device("cpu"), tracking_uri=tracking_uri)
    steps = steps or loaded.steps
    if isinstance(loaded.architecture, TextUNetCondition):
        return _export_text_to_image(loaded, model=model, fmt=fmt, out=out, steps=steps)
    if fmt == "diffusers":
        from pd_core.export.to_diffusers import export_diffusers

        path = export_diffusers(loaded, out=out, steps=steps)
        card = (path / "README.md").read_text(encoding="utf-8")
        return (f"wrote a diffusers folder ({steps}-step {loaded.denoiser.parameterization} sampler) to {path}: "
                f"DDIMPipeline.from_pretrained('{path}')(num_inference_steps={steps}) samples it as pd sample "
                f"does; its model card, {path}/README.md:\n\n{card}")
    from pd_core.export.to_onnx import export_onnx

    path = export_onnx(loaded, out=out, steps=steps)
    return f"wrote the {steps}-step sampler as one ONNX graph (input 'noise', output 'images' in [-1, 1]) to {path}"


def _export_text_to_image(loaded, *, model: str, fmt: str, out: str, steps: int) -> str:
    """A text-to-image student as a StableDiffusionPipeline folder (with the VAE, text encoder and tokenizer of the
    folder it was made from); the summary names the stock-diffusers call and quotes the model card."""
    from pd_core.export.to_sd_pipeline import CARD_FILE, example_w, export_student_checkpoint, usage_line

    if fmt != "diffusers":
        raise ExportError(f"--format {fmt}: a text-to-image model exports as a diffusers StableDiffusionPipeline "
                          f"folder only (--format diffusers)")
    try:
        teacher = text_to_image.folder_of(loaded.manifest, source=model)
    except ValueError as err:
        raise ExportError(str(err)) from None
    path = export_student_checkpoint(loaded, teacher=teacher, out=out, steps=steps)
    guided = loaded.architecture.guidance_embedding
    card = (path / CARD_FILE).read_text(encoding="utf-8")
    return (f"wrote a StableDiffusionPipeline folder ({steps}-step {loaded.denoiser.parameterization} student"
            f"{', guidance embedding' if guided else ''}) to {path}; stock diffusers samples it as pd sample does:\n"
            f"  {usage_line(out=path, steps=steps, w=example_w(loaded.manifest) if guided else 0.0)}\n"
            f"its model card, {path}/{CARD_FILE}:\n\n{card}")
