"""The distilled sampler as an MLflow "models from code" pyfunc.

MLflow copies THIS FILE into the logged model (``python_model=<path of this file>``) and executes it
on load; nothing is cloudpickled. The weights travel as a safetensors artifact (``weights``) and the
checkpoint manifest as JSON (``manifest``), so loading the model never unpickles anything.
``tasks.tracking.sampler_model`` only refers to this file by path: importing it calls
:func:`mlflow.models.set_model`, which is what MLflow needs when it executes the file, but a side effect
nobody else wants.

predict() input (dict or one-row DataFrame): ``num_images`` (default 16), ``steps`` (default: the
step count the student was distilled for), ``seed`` (default 0); for class-conditional nets ``label``
(one class for every image) or the param ``labels`` (a list, one per image; default: class i mod K for
image i) and ``guidance``, the guidance weight w (default 0: the conditional model; a guided-distilled
student takes w itself, a teacher runs classifier-free guidance with two calls per step); the param
``clip`` (default True).
Output: uint8 images, numpy array of shape (num_images, H, W, C), as a PNG would hold them.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


def _first_row(model_input: Any) -> dict[str, Any]:
    """A dict of request fields from a dict, a one-row DataFrame or a list of one dict."""
    if isinstance(model_input, dict):
        return {k: (v[0] if isinstance(v, list) and k != "labels" and len(v) == 1 else v)
                for k, v in model_input.items()}
    if isinstance(model_input, list) and model_input and isinstance(model_input[0], dict):
        return dict(model_input[0])
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # pandas.DataFrame
        rows = model_input.to_dict(orient="records")
        if not rows:
            raise ValueError("predict() got an empty DataFrame; pass one row with num_images, steps, seed")
        return dict(rows[0])
    raise ValueError(f"predict() takes a dict or a one-row DataFrame; got {type(model_input).__name__}")


def _missing(value: Any) -> bool:
    """None/NaN: a field a DataFrame row leaves empty."""
    return value is None or (isinstance(value, float) and value != value)


def _as_int(value: Any, *, name: str, default: int) -> int:
    """An int request field; None/NaN (missing DataFrame cells) mean the default."""
    if _missing(value):
        return default
    out = int(value)
    if out < 1 and name not in ("seed", "label"):
        raise ValueError(f"{name} must be >= 1; got {value}")
    return out


MAX_IMAGES = 4096  # one request's images: bounded, like every input


def _labels(request: dict[str, Any], *, num: int, num_classes: int) -> list[int]:
    """The class of each image: ``labels`` (one per image; [] = not given), else ``label`` for all, else i mod K."""
    labels, label = request.get("labels"), request.get("label")
    if labels is not None and not (isinstance(labels, float) and labels != labels) and len(labels):
        out = [int(v) for v in labels]
        if len(out) != num:
            raise ValueError(f"labels must give one class per image ({num}); got {len(out)}")
        return out
    if not _missing(label):
        return [_as_int(label, name="label", default=0)] * num
    return [i % num_classes for i in range(num)]


class SamplerModel(PythonModel):
    """DDIM sampling from a distilled student, rebuilt from safetensors + manifest."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the network the manifest describes and load the safetensors weights (no pickle).

        The project's U-Net, or a diffusers UNet2DModel for students of imported diffusers teachers
        (then the model's environment needs ``diffusers``).
        """
        # Imported here, not at module level: MLflow executes this file at save time too, and the
        # heavy imports are only needed to sample.
        import torch

        from pd_core.models import model_from_files

        with open(context.artifacts["manifest"], encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model_from_files(weights_path=context.artifacts["weights"], manifest=self.manifest,
                                      device=self.device)

    # The pd.DataFrame hint is one MLflow does not validate against (a dict works just as well); without
    # a hint MLflow warns on every save.
    def predict(self, context: PythonModelContext,  # noqa: ARG002 - PythonModel.predict's signature
                model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Sample ``num_images`` images with ``steps`` DDIM steps from ``seed``; uint8 (N, H, W, C)."""
        import torch

        from pd_core.guidance import guided
        from pd_core.images import to_uint8
        from pd_core.samplers import ddim

        if self.manifest.get("diffusers_unet2d_condition") is not None:
            raise ValueError("this sampler is a text-to-image UNet2DConditionModel, which needs prompts and its VAE: "
                             "sample it with `pd sample --model <this model's URI> --prompt TEXT`, or run the folder "
                             "`pd export --format diffusers` writes with StableDiffusionPipeline")
        request = {**_first_row(model_input), **(params or {})}
        num = _as_int(request.get("num_images"), name="num_images", default=16)
        if num > MAX_IMAGES:
            raise ValueError(f"num_images must be <= {MAX_IMAGES}; got {num}")
        steps = _as_int(request.get("steps"), name="steps", default=int(self.manifest["steps"]))
        seed = _as_int(request.get("seed"), name="seed", default=0)
        clip = bool(request.get("clip", True))
        w = request.get("guidance")
        w = 0.0 if _missing(w) else float(w)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn((num, *self.model.image_shape), generator=gen).to(self.device)  # CPU draw: same anywhere
        denoiser = self.model.denoiser
        if self.model.num_classes > 0:
            y = torch.as_tensor(_labels(request, num=num, num_classes=self.model.num_classes), dtype=torch.long)
            denoiser = guided(denoiser, arch=self.model.architecture, y=y.to(self.device), w=w)
        elif w != 0.0 or not _missing(request.get("label")):
            raise ValueError("guidance and labels need a class-conditional model; this one is unconditional")
        x = ddim(denoiser, z, num_steps=steps, clip=clip, schedule=self.model.schedule)
        return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()  # (B, C, H, W) -> (B, H, W, C)


mlflow.models.set_model(SamplerModel())
