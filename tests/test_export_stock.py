"""Exports a stock pipeline runs right with its defaults:
``DDIMPipeline.from_pretrained(export)(num_inference_steps=N)`` is ``pd sample``; ONNX holds
float64-computed coefficients; export files are readable by others."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pd_core import samplers, schedule
from pd_core.denoiser import Denoiser
from pd_core.export.grid import alpha_sigma64
from pd_core.export.to_diffusers import export_diffusers
from pd_core.export.to_onnx import export_onnx
from pd_core.interop.diffusers import DiffusersUNetNet
from pd_core.models import LoadedModel, load_model
from tests.diffusers_models import diffusers, distilled_chain
from tests.test_export import _run_onnx, pd_sample

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", params=[1000, 100], ids=["T1000", "T100"])
def chain16(request, tmp_path_factory):
    """A diffusers eps teacher of T timesteps distilled 16 -> 8 -> 4 -> 2 -> 1 through the jobs."""
    return distilled_chain(tmp_path_factory.mktemp(f"stock-{request.param}"), start_steps=16,
                           num_train_timesteps=request.param)


def test_the_stock_ddim_pipeline_with_default_arguments_samples_each_export_as_pd_sample(chain16, tmp_path):
    _, store, infos = chain16
    for info in infos:  # the 16-step teacher, then students at 8, 4, 2, 1 steps
        out = export_diffusers(load_model(store, info.key), out=str(tmp_path / f"s{info.steps}"))
        pipe = diffusers.DDIMPipeline.from_pretrained(str(out))
        pipe.set_progress_bar_config(disable=True)
        stock = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=info.steps,
                     output_type="pt").images  # the pipeline's own noise: pd sample's for seed 0
        want = (pd_sample(store, info.key, num=4) + 1) / 2
        assert float(stock.std()) > 1e-2
        torch.testing.assert_close(stock, want, rtol=0, atol=1e-4)
        doc = json.loads((out / "pd_sampler.json").read_text())
        assert doc["clip_sample"] is True and doc["use_clipped_model_output"] is False
        assert doc["timesteps"] == [int(t) for t in pipe.scheduler.timesteps]
        card = (out / "README.md").read_text()
        assert f"num_inference_steps={info.steps})" in card and "DDIMPipeline.from_pretrained" in card


def test_export_folders_and_files_are_readable_by_others_unless_the_umask_says_otherwise(chain16, tmp_path):
    _, store, infos = chain16
    loaded = load_model(store, infos[-1].key)
    for mask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600)):
        old = os.umask(mask)
        try:
            out = export_diffusers(loaded, out=str(tmp_path / f"d{mask:o}"))
            graph = export_onnx(loaded, out=str(tmp_path / f"g{mask:o}.onnx"))
        finally:
            os.umask(old)
        paths = [out, *out.rglob("*")]
        assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {folder_mode}
        assert {stat.S_IMODE(p.stat().st_mode) for p in [graph, *paths] if p.is_file()} == {file_mode}


class EpsOracle(nn.Module):
    """The ideal eps for one target image x at one grid point: eps = (z - alpha x) / sigma, alpha and sigma given."""

    def __init__(self, x: torch.Tensor, *, alpha: float, sigma: float):
        super().__init__()
        self.register_buffer("x", x)
        self.alpha, self.sigma = alpha, sigma
        self.class_embedding = None  # read by DiffusersUNetNet

    def forward(self, z, time, class_labels=None):
        return (z - self.alpha * self.x) / self.sigma


class OracleUNet(EpsOracle):
    """The oracle behind UNet2DModel's interface (``.sample``), for an imported discrete-time model."""

    def forward(self, z, time, class_labels=None):
        return SimpleNamespace(sample=(z - self.alpha * self.x) / self.sigma)


@dataclass(frozen=True)
class OracleArchitecture:
    image_shape: tuple[int, int, int] = (1, 8, 8)
    num_classes: int = 0
    guidance_embedding: bool = False


@pytest.mark.parametrize("kind", ["cosine", "squaredcos_cap_v2"])
def test_onnx_of_an_ideal_eps_model_at_one_step_is_pd_sample_where_the_log_snr_is_extreme(kind, tmp_path):
    sched = schedule.COSINE if kind == "cosine" else \
        schedule.DiscreteSchedule(schedule.ddpm_alphas_cumprod(beta_schedule="squaredcos_cap_v2"))
    lam = sched.logsnr(torch.tensor([1.0], dtype=torch.float64))
    assert float(lam) < -19  # where a float32 Sigmoid kernel underflows
    alpha, sigma = (float(v) for v in alpha_sigma64(lam))
    x = 0.9 * torch.tanh(torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    net = EpsOracle(x, alpha=alpha, sigma=sigma) if kind == "cosine" else \
        DiffusersUNetNet(OracleUNet(x, alpha=alpha, sigma=sigma), schedule=sched)
    model = LoadedModel(denoiser=Denoiser(net, parameterization="eps"), manifest={}, steps=1, schedule=sched,
                        architecture=OracleArchitecture())
    path = export_onnx(model, out=str(tmp_path / "oracle.onnx"))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    want = samplers.ddim(model.denoiser, noise, num_steps=1, schedule=sched)
    np.testing.assert_allclose(want.numpy(), x.expand(3, -1, -1, -1).numpy(), rtol=0, atol=5e-3)  # the oracle
    np.testing.assert_allclose(_run_onnx(path, noise), want.numpy(), rtol=0, atol=1e-4)
