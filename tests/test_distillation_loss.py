"""DistillationLoss: gradients reach only the student, target and weight match an independent computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss
from tests.distill_reference import LMAX, LMIN, C, H, W, np_two_step
from tests.reference import np_alpha_sigma, np_logsnr


class TinyNet(nn.Module):
    """net(z, logsnr) over (B, C, H, W): a per-pixel MLP conditioned on logsnr."""

    def __init__(self, c: int = C, hidden: int = 16):
        super().__init__()
        self.inp = nn.Linear(c + 1, hidden)
        self.out = nn.Linear(hidden, c)

    def forward(self, z, logsnr):
        b, c, h, w = z.shape
        zz = z.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        ll = (logsnr / 20.0)[:, None, None].expand(b, h * w, 1).to(z.dtype)  # (B, HW, 1)
        y = self.out(torch.tanh(self.inp(torch.cat([zz, ll], -1))))  # (B, HW, C)
        return y.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)


def test_distillation_loss_grad_flows_only_into_student():
    torch.manual_seed(0)
    teacher = Denoiser(TinyNet(), parameterization="x")
    student = Denoiser(copy.deepcopy(teacher.net), parameterization="x")
    loss_fn = DistillationLoss(teacher, num_steps=4, weighting="snr_trunc")
    x = torch.rand(16, C, H, W) * 2 - 1
    loss = loss_fn(student, x, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (16,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is None for p in teacher.net.parameters())
    grads = [p.grad for p in student.net.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_distillation_loss_matches_independent_target_and_weight():
    """targets() gives z on the student grid and x_tilde equal to the numpy two-step target; the loss is
    the truncated-SNR weight times the pixel-mean x-error of the student against it."""
    torch.manual_seed(1)
    net = TinyNet().double()
    teacher = Denoiser(net, parameterization="v")
    student = Denoiser(copy.deepcopy(net), parameterization="v")
    n = 4
    loss_fn = DistillationLoss(teacher, num_steps=n, weighting="snr_trunc")
    x = (torch.rand(32, C, H, W, dtype=torch.float64) * 2 - 1)
    z, lam, x_tilde = loss_fn.targets(x, generator=torch.Generator().manual_seed(5))
    assert z.shape == x.shape and lam.shape == (32,) and x_tilde.shape == x.shape
    # invert the schedule independently: t = (arctan(exp(-lambda/2)) - b) / a, then i = t N - 1
    b_ = np.arctan(np.exp(-LMAX / 2))
    a_ = np.arctan(np.exp(-LMIN / 2)) - b_
    i = (np.arctan(np.exp(-lam.double().numpy() / 2)) - b_) / a_ * n - 1
    np.testing.assert_allclose(i, np.round(i), atol=1e-5)  # on the grid {1/N, ..., 1}
    i = np.round(i).astype(int)
    assert set(i) <= set(range(n)) and len(set(i)) > 1
    t = (i + 1) / n

    def np_teacher(zz, ll):
        with torch.no_grad():
            xh, eh = teacher(torch.from_numpy(zz), torch.from_numpy(ll))
        return xh.numpy(), eh.numpy()

    z_np = z.double().numpy()
    z_two, x_mid = np_two_step(np_teacher, z_np, t, n)
    a_t, s_t = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t)))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t - 1 / n)))
    two_step_target = (z_two - (s_s / s_t) * z_np) / (a_s - (s_s / s_t) * a_t)
    expected = np.where((i == 0)[:, None, None, None], x_mid, two_step_target)
    # the loss stores x_tilde in float32
    np.testing.assert_allclose(x_tilde.double().numpy(), expected, rtol=1e-5, atol=1e-5)

    loss = loss_fn(student, x, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        xs, _ = student(z, lam.to(z.dtype))
    x_err = ((xs.double().numpy() - expected) ** 2).reshape(32, -1).mean(1)
    w = np.maximum(np.exp(np_logsnr(t)), 1.0)
    np.testing.assert_allclose(loss.detach().double().numpy(), w * x_err, rtol=1e-3, atol=1e-7)


def test_distillation_loss_refuses_eps_snr_trunc():
    teacher = Denoiser(TinyNet(), parameterization="eps")
    loss_fn = DistillationLoss(teacher, num_steps=2, weighting="snr_trunc")
    with pytest.raises(ValueError, match="diverge"):
        loss_fn(Denoiser(TinyNet(), parameterization="eps"), torch.zeros(2, C, H, W))


def test_distillation_loss_seeded_is_deterministic():
    torch.manual_seed(0)
    teacher = Denoiser(TinyNet(), parameterization="x")
    student = Denoiser(copy.deepcopy(teacher.net), parameterization="x")
    loss_fn = DistillationLoss(teacher, num_steps=8, weighting="snr_plus_one")
    x = torch.rand(8, C, H, W) * 2 - 1
    a = loss_fn(student, x, generator=torch.Generator().manual_seed(3))
    b = loss_fn(student, x, generator=torch.Generator().manual_seed(3))
    c = loss_fn(student, x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
