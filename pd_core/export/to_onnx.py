"""The whole N-step DDIM sampler as one ONNX graph: noise (B, C, H, W) in, images in [-1, 1] out.

The loop is unrolled: step i = N - 1 .. 0 evaluates the network at the grid constants of
:func:`pd_core.export.grid.sampler_grid` (lambda_{i+1}, or the integer timestep tau_{i+1} of a
diffusers UNet2DModel), reads (x_hat, eps_hat) with the student's parameterization
(:mod:`pd_core.parameterization`, alpha and sigma as float32 constants computed in float64: no
Sigmoid of an extreme log-SNR in the graph), clips x_hat to [-1, 1] and recomputes eps_hat from it
(or keeps the model's eps_hat on a discrete schedule, as ``samplers.ddim`` does), then takes the
DDIM step z <- alpha_s x_hat + sigma_s eps_hat to where the sampler's step lands; a step landing on
the clean end returns x_hat. That is ``samplers.ddim``, so onnxruntime reproduces ``pd sample`` on
the same noise. A class-conditional network takes a second input ``labels`` (B,) int64, and a
guided-distilled student (a network with a guidance embedding) a third, ``guidance`` (B,) float32:
the guidance weight w of each image (its own input; a teacher's two-call classifier-free guidance is
not exported). The batch dimension is dynamic. Steps, parameterization and the source checkpoint
are recorded in the graph's metadata.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from pd_core.export.files import check_steps, new_output_path, publish
from pd_core.export.grid import sampler_grid
from pd_core.interop.diffusers import DiffusersUNetNet
from pd_core.models import LoadedModel
from pd_core.schedule import DiscreteSchedule

MAX_STEPS = 64  # the graph holds one copy of the network call per step
OPSET = 17


def x_eps_constants(out: Tensor, *, z: Tensor, alpha: Tensor, sigma: Tensor, kind: str, clip: bool,
                    keep_eps: bool) -> tuple[Tensor, Tensor]:
    """``parameterization.to_x_eps`` with alpha and sigma given as constants (scalars): the same equations."""
    eps_hat = None
    if kind == "eps":
        eps_hat = out
        x_hat = (z - sigma * out) / alpha
    elif kind == "x":
        x_hat = out
    elif kind == "v":
        x_hat = alpha * z - sigma * out
    else:  # both
        x_out, eps_out = out.chunk(2, dim=1)
        x_hat = sigma**2 * x_out + alpha * (z - sigma * eps_out)
    if eps_hat is None:
        eps_hat = (z - alpha * x_hat) / sigma  # the model's eps, from the unclipped x_hat
    if clip:
        x_hat = x_hat.clamp(-1.0, 1.0)
        if not keep_eps:
            eps_hat = (z - alpha * x_hat) / sigma
    return x_hat, eps_hat


class UnrolledDDIM(nn.Module):
    """``samplers.ddim`` with the grid baked in as constants (see the module docstring)."""

    def __init__(self, model: LoadedModel, *, steps: int):
        super().__init__()
        grid = sampler_grid(model.schedule, steps=steps)
        self.net = model.denoiser.net
        self.kind = model.denoiser.parameterization
        self.steps = steps
        self.keep_eps = isinstance(model.schedule, DiscreteSchedule)  # as samplers.ddim's default
        self.clean = grid.dest_clean
        self.conditional = model.num_classes > 0
        self.takes_w = model.architecture.guidance_embedding
        for name in ("logsnr", "alpha", "sigma", "dest_alpha", "dest_sigma"):
            self.register_buffer(name, getattr(grid, name).clone(), persistent=False)
        if isinstance(self.net, DiffusersUNetNet):  # the UNet2DModel's input: integer timesteps
            self.register_buffer("timestep", grid.timestep.clone(), persistent=False)

    def _network(self, z: Tensor, i: int, per_example: Tensor, labels: Tensor | None,
                 guidance: Tensor | None) -> Tensor:
        """The network at grid point i, as a (B,) vector of its time input."""
        if isinstance(self.net, DiffusersUNetNet):
            return self.net.at_timestep(z, self.timestep[i] * per_example, labels)
        lam = self.logsnr[i] * per_example
        if guidance is not None:
            return self.net(z, lam, labels, guidance)
        return self.net(z, lam, labels) if labels is not None else self.net(z, lam)

    def forward(self, noise: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        z = noise
        per_example = torch.ones_like(noise[:, 0, 0, 0])  # (B,): keeps the batch dimension dynamic
        for i in reversed(range(self.steps)):
            out = self._network(z, i + 1, per_example, labels, guidance)
            x_hat, eps_hat = x_eps_constants(out, z=z, alpha=self.alpha[i + 1], sigma=self.sigma[i + 1],
                                             kind=self.kind, clip=True, keep_eps=self.keep_eps)
            z = x_hat if self.clean[i] else self.dest_alpha[i] * x_hat + self.dest_sigma[i] * eps_hat
        return z


def export_onnx(model: LoadedModel, *, out: str, steps: int | None = None) -> Path:
    """Write the ``steps``-step sampler of ``model`` (default: its own step count) as one ONNX file at ``out``."""
    import onnx  # the optional [onnx] extra

    steps = steps or model.steps
    check_steps(model.schedule, steps=steps, most=MAX_STEPS)  # the graph holds one network call per step
    target = new_output_path(out, what="an ONNX file")
    graph = UnrolledDDIM(model, steps=steps).eval().cpu().float()
    shape = model.image_shape
    noise = torch.randn(2, *shape)
    inputs: tuple[Tensor, ...] = (noise,)
    names, axes = ["noise"], {"noise": {0: "batch"}, "images": {0: "batch"}}
    if graph.conditional:
        inputs = (noise, torch.zeros(2, dtype=torch.long))
        names.append("labels")
        axes["labels"] = {0: "batch"}
    if graph.takes_w:
        inputs = (*inputs, torch.zeros(2))
        names.append("guidance")
        axes["guidance"] = {0: "batch"}
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about Python-side shape checks: the shapes are fixed
            torch.onnx.export(graph, inputs, str(tmp), input_names=names, output_names=["images"],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        proto = onnx.load(str(tmp))
        meta = {"pd.steps": steps, "pd.parameterization": graph.kind, "pd.sample_shape": list(shape),
                "pd.num_classes": model.num_classes, "pd.guidance_input": graph.takes_w,
                "pd.source_sha256": model.manifest.get("sha256"),
                "pd.output": "images in [-1, 1]; uint8 = round((x + 1) * 127.5)"}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(tmp))
        publish(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
