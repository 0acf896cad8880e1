"""Stage 1 of guided distillation (a w-conditioned student of the guided teacher): target and loss against a
float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pd_core.denoiser import Denoiser
from pd_core.guidance import (
    GuidanceLoss,
    GuidedDenoiser,
)
from tests.guidance_reference import AnalyticNet, C, H, K, W, _rel_err, np_guided, np_x_eps
from tests.reference import np_alpha_sigma, np_logsnr


@pytest.mark.parametrize("kind,weighting", [("x", "snr_trunc"), ("eps", "snr"), ("v", "snr_plus_one")])
def test_stage_one_target_and_loss_match_a_float64_reference(kind, weighting):
    """targets draw t ~ U[0,1), eps, w ~ U[w_min, w_max] (in that order) and return the guided teacher's x_hat_w."""
    teacher = AnalyticNet(5, out_channels=C)
    student = AnalyticNet(6, out_channels=C, takes_w=True)
    rng = np.random.default_rng(0)
    b = 64
    x = torch.from_numpy(np.clip(rng.normal(size=(b, C, H, W)) * 0.5, -1, 1))
    y = torch.from_numpy(rng.integers(0, K, size=b))
    loss = GuidanceLoss(Denoiser(teacher, parameterization=kind), null_label=K, w_min=0.5, w_max=3.0,
                        weighting=weighting)
    z, lam, w, x_w = loss.targets(x, y, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # the same draws, made here
    t = torch.rand(b, dtype=torch.float64, generator=g).numpy()
    eps = torch.randn(x.shape, dtype=torch.float64, generator=g).numpy()
    w_ref = 0.5 + 2.5 * torch.rand(b, dtype=torch.float64, generator=g).numpy()
    lam_ref = np_logsnr(t)
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam_ref))
    z_ref = a * x.numpy() + s * eps
    assert (w_ref.min() >= 0.5) and (w_ref.max() <= 3.0) and np.ptp(w_ref) > 1.0
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lam.numpy(), lam_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z.numpy(), z_ref, rtol=0, atol=1e-12)
    ref_x_w, _, _ = np_guided(teacher, z_ref, lam_ref, y.numpy(), w_ref, kind)
    assert _rel_err(x_w.numpy(), ref_x_w) < 1e-9

    per_example = loss(Denoiser(student, parameterization=kind), x, y, generator=torch.Generator().manual_seed(7))
    x_s, _ = np_x_eps(student.numpy(z_ref, lam_ref, y.numpy(), w_ref), z_ref, lam_ref, kind)
    snr = np.exp(lam_ref)
    weight = {"snr_trunc": np.maximum(snr, 1.0), "snr": snr, "snr_plus_one": 1.0 + snr}[weighting]
    ref_loss = weight * ((x_s - ref_x_w) ** 2).reshape(b, -1).mean(axis=1)
    np.testing.assert_allclose(per_example.double().numpy(), ref_loss, rtol=2e-5, atol=1e-7)  # float32 loss


def test_stage_one_loss_is_zero_when_the_student_is_the_guided_teacher():
    """A student that computes x_hat_w(z, c, w) itself has zero loss: the target is exactly the guided model."""

    class GuidedAsNet(nn.Module):
        def __init__(self, inner: AnalyticNet):
            super().__init__()
            self.inner = inner

        def forward(self, z, logsnr, y=None, w=None):
            x_w, _ = GuidedDenoiser(Denoiser(self.inner, parameterization="x"), y=y, w=w, null_label=K)(z, logsnr)
            return x_w

    teacher = AnalyticNet(8)
    x = torch.rand(16, C, H, W, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, K, (16,))
    loss = GuidanceLoss(Denoiser(teacher, parameterization="x"), null_label=K, w_min=0.0, w_max=4.0,
                        weighting="snr_trunc")
    out = loss(Denoiser(GuidedAsNet(teacher), parameterization="x"), x, y, generator=torch.Generator().manual_seed(0))
    assert out.shape == (16,) and float(out.abs().max()) == 0.0
