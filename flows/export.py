"""``pd export``: a checkpoint's (or a registered MLflow model's) few-step sampler as a diffusers folder or ONNX."""

from __future__ import annotations

import torch

from flows.sampling import load_any_model
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
