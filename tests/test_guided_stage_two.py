"""Stage 2 of guided distillation, progressive distillation of a w-conditioned model: one student step on x_tilde
lands on the guided teacher's two-step point (float64), and the loss binds the same w and label to both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import distill
from pd_core.denoiser import Denoiser
from pd_core.guidance import (
    GuidedDenoiser,
)
from tests.guidance_reference import AnalyticNet, C, H, K, W, np_guided, np_x_eps
from tests.reference import np_alpha_sigma, np_logsnr


def np_two_step_guided(fn, z, t, n):
    """Two DDIM steps t -> t - 0.5/N -> t - 1/N of any numpy (x_hat, eps_hat) function, no clipping."""
    lam_t, lam_m, lam_s = np_logsnr(t), np_logsnr(t - 0.5 / n), np_logsnr(t - 1.0 / n)
    a_m, s_m = (v[:, None, None, None] for v in np_alpha_sigma(lam_m))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(lam_s))
    x1, e1 = fn(z, lam_t)
    x2, e2 = fn(a_m * x1 + s_m * e1, lam_m)
    return a_s * x2 + s_s * e2


def np_student_step(x_tilde, z, t, n):
    a_t, s_t = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t)))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t - 1.0 / n)))
    return a_s * x_tilde + s_s * (z - a_t * x_tilde) / s_t


@pytest.mark.parametrize("n", [2, 4, 16])
@pytest.mark.parametrize("w", [0.0, 1.5, 4.0])
def test_one_student_step_on_x_tilde_lands_on_the_guided_teachers_two_step_point(n, w):
    """For a fixed w and label, stage 2's target (pd_core.distill) over the guided teacher: one student DDIM step
    with x_hat = x_tilde lands on the guided teacher's two-step DDIM point."""
    teacher = AnalyticNet(9)
    rng = np.random.default_rng(n)
    b = 6
    t = (rng.integers(1, n, size=b) + 1) / n
    z = rng.normal(size=(b, C, H, W))
    y = rng.integers(0, K, size=b)
    fn = GuidedDenoiser(Denoiser(teacher, parameterization="v"), y=torch.from_numpy(y), w=w, null_label=K)
    x_tilde = distill.distillation_target(fn, z=torch.from_numpy(z), t=torch.from_numpy(t), num_steps=n)

    def np_fn(zz, lam):
        x_w, _, eps_w = np_guided(teacher, zz, lam, y, np.full(b, w), "v")
        return x_w, eps_w

    z_two = np_two_step_guided(np_fn, z, t, n)
    assert np.abs(np_student_step(x_tilde.numpy(), z, t, n) - z_two).max() < 1e-9


def test_stage_two_loss_binds_the_same_w_and_label_to_teacher_and_student():
    """distill_loss_fn with a guidance range draws w first, then the round's draws; teacher and student are the
    w-conditioned nets at that w and the batch's labels."""
    from pd_core.config import DiffusionConfig
    from pd_core.schedule import COSINE
    from pd_core.train.phases import distill_loss_fn

    teacher, student = AnalyticNet(10, takes_w=True), AnalyticNet(11, takes_w=True)
    n, b = 4, 32
    rng = np.random.default_rng(1)
    x = torch.from_numpy(np.clip(rng.normal(size=(b, C, H, W)) * 0.5, -1, 1))
    y = torch.from_numpy(rng.integers(0, K, size=b))
    fn = distill_loss_fn(net=student, teacher_net=teacher, student_steps=n, diffusion_cfg=DiffusionConfig(),
                         schedule=COSINE, generator=torch.Generator().manual_seed(3), guidance_range=(1.0, 3.0))
    out = fn(x, y).double().numpy()

    g = torch.Generator().manual_seed(3)
    w = 1.0 + 2.0 * torch.rand(b, dtype=torch.float64, generator=g).numpy()
    i = torch.randint(0, n, (b,), generator=g).numpy()
    t = (i + 1) / n
    eps = torch.randn(x.shape, dtype=torch.float64, generator=g).numpy()
    lam = np_logsnr(t)
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam))
    z = a * x.numpy() + s * eps

    def np_teacher(zz, ll):
        return np_x_eps(teacher.numpy(zz, ll, y.numpy(), w), zz, ll, "x")

    a_t, s_t = a, s
    lam_s = np_logsnr(np.maximum(t - 1.0 / n, 0))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(lam_s))
    z_two = np_two_step_guided(np_teacher, z, t, n)
    x_tilde = (z_two - (s_s / s_t) * z) / (a_s - (s_s / s_t) * a_t)
    lam_m = np_logsnr(t - 0.5 / n)
    a_m, s_m = (v[:, None, None, None] for v in np_alpha_sigma(lam_m))
    x1, e1 = np_teacher(z, lam)
    x_mid, _ = np_teacher(a_m * x1 + s_m * e1, lam_m)
    x_tilde = np.where((i == 0)[:, None, None, None], x_mid, x_tilde)
    x_s = student.numpy(z, lam, y.numpy(), w)
    ref = np.maximum(np.exp(lam), 1.0) * ((x_s - x_tilde) ** 2).reshape(b, -1).mean(axis=1)
    assert (i == 0).any() and (i > 0).any()
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-7)
