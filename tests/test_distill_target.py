"""Progressive distillation target (Algorithm 2) against an independent float64 numpy two-step DDIM, on a numpy
teacher and through a real UNet denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import distill
from pd_core.denoiser import Denoiser
from tests.distill_reference import C, H, NumpyTeacher, W, _grid_times, np_student_step, np_two_step
from tests.reference import np_alpha_sigma, np_logsnr


@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize("n", [2, 4, 3, 64, 4096])
@pytest.mark.parametrize("seed", [0, 1])
def test_student_step_on_x_tilde_lands_on_teacher_two_step(n, consistent, seed):
    rng = np.random.default_rng(100 + seed)
    b = 8
    t = _grid_times(n, rng, b, include_first=False)
    assert (t > 1.0 / n).all()
    teacher = NumpyTeacher(seed, consistent=consistent)
    data = np.clip(rng.normal(size=(b, C, H, W)) * 0.5, -1, 1)
    a_t, s_t = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t)))
    z = a_t * data + s_t * rng.normal(size=(b, C, H, W))

    x_tilde = distill.distillation_target(teacher.torch(), z=torch.from_numpy(z), t=torch.from_numpy(t), num_steps=n)
    assert x_tilde.shape == (b, C, H, W) and x_tilde.dtype == torch.float64
    z_two, _ = np_two_step(teacher, z, t, n)
    z_one = np_student_step(x_tilde.numpy(), z, t, n)
    assert np.abs(z_one - z_two).max() < 1e-9, np.abs(z_one - z_two).max()


@pytest.mark.parametrize("n", [1, 2, 4, 4096])
def test_first_index_target_is_teacher_x_hat_at_half_step(n):
    """i = 0 (t = 1/N): x_tilde = teacher x_hat(z_t', t') with t' = t - 0.5/N (after one unclipped teacher step)."""
    rng = np.random.default_rng(n)
    b = 5
    t = np.full(b, 1.0 / n)
    teacher = NumpyTeacher(7, consistent=False)
    z = rng.normal(size=(b, C, H, W))
    x_tilde = distill.distillation_target(teacher.torch(), z=torch.from_numpy(z), t=torch.from_numpy(t), num_steps=n)
    _, x_mid = np_two_step(teacher, z, t, n)
    np.testing.assert_allclose(x_tilde.numpy(), x_mid, rtol=0, atol=1e-12)
    assert np.abs(x_mid).max() > 1.0  # not clipped
    assert np.isfinite(x_tilde.numpy()).all()


def test_mixed_batch_first_index_and_others():
    """A batch mixing i = 0 and i > 0 picks the right target per example."""
    n = 8
    rng = np.random.default_rng(3)
    t = np.array([1 / 8, 2 / 8, 1 / 8, 1.0, 5 / 8, 1 / 8])
    teacher = NumpyTeacher(11, consistent=True)
    z = rng.normal(size=(len(t), C, H, W))
    x_tilde = distill.distillation_target(teacher.torch(), z=torch.from_numpy(z), t=torch.from_numpy(t),
                                          num_steps=n).numpy()
    z_two, x_mid = np_two_step(teacher, z, t, n)
    first = t == 1 / n
    np.testing.assert_allclose(x_tilde[first], x_mid[first], atol=1e-12)
    z_one = np_student_step(x_tilde, z, t, n)
    assert np.abs(z_one[~first] - z_two[~first]).max() < 1e-9


def test_target_calls_teacher_twice():
    teacher = NumpyTeacher(0, consistent=True)
    z = torch.randn(4, C, H, W, dtype=torch.float64)
    distill.distillation_target(teacher.torch(), z=z, t=torch.full((4,), 0.5, dtype=torch.float64), num_steps=4)
    assert teacher.calls == 2


def test_target_with_float32_times_and_state():
    """float32 t on the grid is accepted (as DistillationLoss produces it)."""
    teacher = NumpyTeacher(0, consistent=True)
    z = torch.randn(4, C, H, W, dtype=torch.float64)
    t32 = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float32)
    a = distill.distillation_target(teacher.torch(), z=z, t=t32, num_steps=4)
    b = distill.distillation_target(teacher.torch(), z=z, t=t32.double(), num_steps=4)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-12)


def test_ddim_step_helper():
    rng = np.random.default_rng(0)
    x, e = rng.normal(size=(3, C, H, W)), rng.normal(size=(3, C, H, W))
    lam = np.array([-3.0, 0.0, 5.0])
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam))
    out = distill.ddim_step(x_hat=torch.from_numpy(x), eps_hat=torch.from_numpy(e), logsnr_s=torch.from_numpy(lam))
    np.testing.assert_allclose(out.numpy(), a * x + s * e, atol=1e-14)


@pytest.mark.parametrize("kind", ["eps", "x", "v", "both"])
def test_property_through_real_unet_denoiser_float64(kind):
    """The same property through Denoiser(UNet) in float64, for every parameterization."""
    from pd_core.parameterization import output_channels
    from pd_core.unet import UNet, UNetSpec

    torch.manual_seed(0)
    spec = UNetSpec(in_channels=2, out_channels=output_channels(kind=kind, channels=2), image_size=4, ch=8, emb_ch=16,
                    ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,), dropout=0.0)
    net = UNet(spec).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    teacher = Denoiser(net, parameterization=kind)

    def np_teacher(zz, ll):
        with torch.no_grad():
            xh, eh = teacher(torch.from_numpy(zz), torch.from_numpy(ll))
        return xh.numpy(), eh.numpy()

    n = 16
    t = np.array([1.0, 15 / 16, 0.5, 2 / 16, 1 / 16])
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5, 2, 4, 4))
    with torch.no_grad():
        x_tilde = distill.distillation_target(teacher, z=torch.from_numpy(z), t=torch.from_numpy(t),
                                              num_steps=n).numpy()
    z_two, x_mid = np_two_step(np_teacher, z, t, n)
    z_one = np_student_step(x_tilde, z, t, n)
    assert np.abs(z_one[:4] - z_two[:4]).max() < 1e-9
    np.testing.assert_allclose(x_tilde[4], x_mid[4], atol=1e-12)
