"""Progressive distillation target (Algorithm 2) against an independent float64 numpy two-step DDIM."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pd_core import distill
from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss

C, H, W = 3, 2, 2
LMIN, LMAX = -20.0, 20.0


# ---- independent reference (numpy float64) -------------------------------------------------------

from tests.reference import np_alpha_sigma, np_logsnr  # noqa: E402


class NumpyTeacher:
    """A random smooth teacher. ``consistent``: eps_hat derived from x_hat (as every parameterization
    does); otherwise an arbitrary, inconsistent (x_hat, eps_hat) pair from two unrelated functions.
    x_hat is scaled to exceed [-1, 1], so any clipping inside distillation would show."""

    def __init__(self, seed: int, *, consistent: bool):
        rng = np.random.default_rng(seed)
        self.w1 = rng.normal(size=(C, C)) * 0.8
        self.w2 = rng.normal(size=(C, C)) * 0.8
        self.c1 = rng.normal(size=(C,))
        self.c2 = rng.normal(size=(C,))
        self.consistent = consistent
        self.calls = 0

    def __call__(self, z: np.ndarray, lam: np.ndarray):  # z (B, C, H, W), lam (B,)
        self.calls += 1
        f = np.sin(lam / 5.0)[:, None, None, None] * self.c1[None, :, None, None]
        x_hat = 2.5 * np.tanh(np.einsum("oc,bchw->bohw", self.w1, z) + f)
        alpha, sigma = (v[:, None, None, None] for v in np_alpha_sigma(lam))
        if self.consistent:
            eps_hat = (z - alpha * x_hat) / sigma
        else:
            g = np.cos(lam / 3.0)[:, None, None, None] * self.c2[None, :, None, None]
            eps_hat = np.tanh(np.einsum("oc,bchw->bohw", self.w2, z) + g) + 0.1 * z
        return x_hat, eps_hat

    def torch(self):
        """The same teacher as a torch DenoiserFn (float64 in, float64 out)."""
        def fn(z: torch.Tensor, lam: torch.Tensor):
            assert z.dtype == torch.float64 and lam.shape == (z.shape[0],)
            x_hat, eps_hat = self(z.numpy(), lam.numpy())
            return torch.from_numpy(x_hat), torch.from_numpy(eps_hat)
        return fn


def np_two_step(teacher, z, t, n):
    """Teacher DDIM t -> t - 0.5/N -> t - 1/N, no clipping; returns (z_t'', x_hat at t')."""
    lam_t, lam_m, lam_s = np_logsnr(t), np_logsnr(t - 0.5 / n), np_logsnr(t - 1.0 / n)
    a_m, s_m = (v[:, None, None, None] for v in np_alpha_sigma(lam_m))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(lam_s))
    x1, e1 = teacher(z, lam_t)
    z_mid = a_m * x1 + s_m * e1
    x2, e2 = teacher(z_mid, lam_m)
    return a_s * x2 + s_s * e2, x2


def np_student_step(x_tilde, z, t, n):
    """One student DDIM step t -> t - 1/N with x_hat = x_tilde and eps_hat = (z - alpha_t x_tilde) / sigma_t."""
    a_t, s_t = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t)))
    a_s, s_s = (v[:, None, None, None] for v in np_alpha_sigma(np_logsnr(t - 1.0 / n)))
    return a_s * x_tilde + s_s * (z - a_t * x_tilde) / s_t


def _grid_times(n: int, rng: np.random.Generator, size: int, *, include_first: bool) -> np.ndarray:
    lo = 0 if include_first else 1
    i = rng.integers(lo, n, size=size) if n > lo else np.zeros(size, dtype=int)
    i[0] = n - 1  # always include t = 1 (the hardest: alpha_t = 4.5e-5)
    if n > 1 and not include_first:
        i[1] = 1
    return (i + 1) / n


# ---- the key property ----------------------------------------------------------------------------

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


# ---- argument errors ------------------------------------------------------------------------------

def _call(t, n, z=None):
    teacher = NumpyTeacher(0, consistent=True).torch()
    z = torch.zeros(len(t), C, H, W, dtype=torch.float64) if z is None else z
    return distill.distillation_target(teacher, z=z, t=torch.tensor(t, dtype=torch.float64), num_steps=n)


@pytest.mark.parametrize("t,n", [([0.3], 4), ([0.25, 0.6], 4), ([0.0], 4), ([1.25], 4), ([-0.25], 4),
                                 ([0.5], 1), ([1.0 + 1.0 / 4096], 4096), ([0.5 / 4096 + 0.5], 4096)])
def test_t_not_on_grid_or_out_of_range_raises(t, n):
    with pytest.raises(ValueError, match=r"\bt\b"):
        _call(t, n)


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True])
def test_bad_num_steps_raises(n):
    with pytest.raises(ValueError, match="num_steps"):
        _call([1.0], n)
    with pytest.raises(ValueError, match="num_steps"):
        DistillationLoss(Denoiser(nn.Identity(), parameterization="x"), num_steps=n, weighting="snr_trunc")


def test_t_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"\bt\b"):
        distill.distillation_target(NumpyTeacher(0, consistent=True).torch(),
                                    z=torch.zeros(2, C, H, W, dtype=torch.float64),
                                    t=torch.ones(2, 1, dtype=torch.float64), num_steps=2)
    with pytest.raises(ValueError, match=r"\bt\b"):
        distill.distillation_target(NumpyTeacher(0, consistent=True).torch(),
                                    z=torch.zeros(2, C, H, W, dtype=torch.float64),
                                    t=torch.ones(3, dtype=torch.float64), num_steps=2)


# ---- DistillationLoss ---------------------------------------------------------------------------

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
