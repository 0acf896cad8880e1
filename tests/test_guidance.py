"""Classifier-free guidance and stage 1 of guided distillation against float64 numpy references.

The teacher is an analytic class-conditional "net" with a numpy twin, so every guided quantity has an
independent computation: the network output in numpy, the parameterization's formula in numpy, the
guided combination in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pd_core import distill
from pd_core.denoiser import Denoiser
from pd_core.guidance import (
    GuidanceLoss,
    GuidedDenoiser,
    class_balanced_labels,
    drop_labels,
    guided,
    guided_combination,
    sample_guidance,
)
from pd_core.unet import UNetSpec
from tests.reference import np_alpha_sigma, np_logsnr

C, H, W = 2, 2, 2
K = 3  # classes; label K is the null class
PARAMETERIZATIONS = ("eps", "x", "v", "both")


class AnalyticNet(nn.Module):
    """out = 2.5 tanh(A z + sin(lambda / 5) c_y + w g): class-conditional (K + 1 rows, the last the null class),
    optionally taking a guidance weight w. 2C output channels for ``both``."""

    def __init__(self, seed: int, *, out_channels: int = C, takes_w: bool = False):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(out_channels, C)) * 0.7
        self.c = rng.normal(size=(K + 1, out_channels))
        self.g = rng.normal(size=(out_channels,)) * 0.3
        self.takes_w = takes_w
        self.calls = 0

    def numpy(self, z: np.ndarray, lam: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        pre = np.einsum("oc,bchw->bohw", self.a, z) + (np.sin(lam / 5.0)[:, None] * self.c[y])[:, :, None, None]
        if self.takes_w:
            pre = pre + (w[:, None] * self.g[None])[:, :, None, None]
        return 2.5 * np.tanh(pre)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        assert z.dtype == torch.float64 and y is not None and (w is not None) == self.takes_w
        self.calls += 1
        out = self.numpy(z.numpy(), logsnr.numpy(), y.numpy(), None if w is None else w.double().numpy())
        return torch.from_numpy(out)


def np_x_eps(out: np.ndarray, z: np.ndarray, lam: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The parameterizations of docs/design.md, written out independently."""
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam))
    if kind == "eps":
        return (z - s * out) / a, out
    if kind == "x":
        x = out
    elif kind == "v":
        x = a * z - s * out
    else:
        x = s**2 * out[:, :C] + a * (z - s * out[:, C:])
    return x, (z - a * x) / s


def np_guided(net: AnalyticNet, z, lam, y, w, kind):
    """(x_w, eps_w combined on eps, eps_w from x_w) in float64 numpy."""
    null = np.full_like(y, K)
    x_c, e_c = np_x_eps(net.numpy(z, lam, y), z, lam, kind)
    x_u, e_u = np_x_eps(net.numpy(z, lam, null), z, lam, kind)
    wb = np.asarray(w, dtype=np.float64).reshape(-1, 1, 1, 1)
    x_w = (1 + wb) * x_c - wb * x_u
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam))
    return x_w, (1 + wb) * e_c - wb * e_u, (z - a * x_w) / s


def _batch(seed: int, b: int = 6):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(b, C, H, W))
    lam = np.array([-20.0, -7.5, -1.0, 0.0, 3.0, 20.0])[:b]
    y = rng.integers(0, K, size=b)
    return z, lam, y


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("w", [0.0, 0.3, 2.0, 7.5])
def test_guided_combination_matches_a_float64_reference_for_every_parameterization(kind, w):
    net = AnalyticNet(1, out_channels=2 * C if kind == "both" else C)
    z, lam, y = _batch(0)
    guided_fn = GuidedDenoiser(Denoiser(net, parameterization=kind), y=torch.from_numpy(y), w=w, null_label=K)
    x_w, eps_w = guided_fn(torch.from_numpy(z), torch.from_numpy(lam))
    ref_x, ref_eps_combined, ref_eps_from_x = np_guided(net, z, lam, y, w, kind)
    assert _rel_err(x_w.numpy(), ref_x) < 1e-12
    assert _rel_err(eps_w.numpy(), ref_eps_combined) < 1e-12
    assert net.calls == 1  # conditional and null class in one call on the doubled batch


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_combining_eps_or_combining_x_is_the_same_guided_model(kind):
    """eps_w = (1 + w) eps_c - w eps_u equals (z - alpha x_w) / sigma: the eps- and x-combinations agree."""
    net = AnalyticNet(2, out_channels=2 * C if kind == "both" else C)
    z, lam, y = _batch(1)
    w = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    x_w, eps_w = GuidedDenoiser(Denoiser(net, parameterization=kind), y=torch.from_numpy(y),
                                w=torch.from_numpy(w), null_label=K)(torch.from_numpy(z), torch.from_numpy(lam))
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam))
    # lambda = -20 (alpha = 4.5e-5) amplifies an eps teacher's x by 1/alpha: compare relative to the values' size
    assert _rel_err(eps_w.numpy(), (z - a * x_w.numpy()) / s) < 1e-9
    _, ref_combined, ref_from_x = np_guided(net, z, lam, y, w, kind)
    assert _rel_err(ref_combined, ref_from_x) < 1e-9


def test_guided_combination_broadcasts_one_weight_per_example():
    cond = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    uncond = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    out = guided_combination(conditional=cond, unconditional=uncond, w=torch.tensor([0.0, 1.0, 2.5]))
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.5]


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_w_zero_is_exactly_the_conditional_model(kind):
    net = AnalyticNet(3, out_channels=2 * C if kind == "both" else C)
    z, lam, y = (torch.from_numpy(v) for v in _batch(2))
    plain = Denoiser(net, parameterization=kind).with_labels(y)(z, lam)
    zero = GuidedDenoiser(Denoiser(net, parameterization=kind), y=y, w=0.0, null_label=K)(z, lam)
    for a, b in zip(plain, zero, strict=True):
        assert torch.equal(a, b)


def _spec(**kw) -> UNetSpec:
    base = dict(in_channels=1, out_channels=1, image_size=8, ch=16, emb_ch=32, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0, norm_groups=8, num_classes=K, null_class=True)
    return UNetSpec(**{**base, **kw})


def test_guided_picks_one_call_for_w_zero_or_a_w_net_and_two_for_a_guided_teacher():
    net = AnalyticNet(4)
    y = torch.tensor([0, 1, 2])
    denoiser = Denoiser(net, parameterization="x")
    assert isinstance(guided(denoiser, arch=_spec(), y=y, w=0.0), Denoiser)
    assert isinstance(guided(denoiser, arch=_spec(), y=y, w=1.5), GuidedDenoiser)
    student = guided(Denoiser(AnalyticNet(4, takes_w=True), parameterization="x"),
                     arch=_spec(guidance_embedding=True), y=y, w=1.5)
    assert isinstance(student, Denoiser) and student.w.tolist() == [1.5] * 3 and torch.equal(student.y, y)


@pytest.mark.parametrize("kw,match", [
    (dict(arch=_spec(num_classes=0, null_class=False)), "class-conditional"),
    (dict(arch=_spec(null_class=False), w=1.0), "null class"),
    (dict(w=-0.5), "w must be >= 0"),
    (dict(w=float("nan")), "w must be >= 0"),
    (dict(y=torch.tensor([0, 3])), r"labels must lie in \[0, 2\]"),
    (dict(y=torch.tensor([0.0, 1.0])), "int64"),
])
def test_guided_refuses_what_it_cannot_sample(kw, match):
    args = {**dict(arch=_spec(), y=torch.tensor([0, 1]), w=1.0), **kw}
    with pytest.raises(ValueError, match=match):
        guided(Denoiser(AnalyticNet(0), parameterization="x"), **args)


def test_guided_denoiser_refuses_a_batch_of_another_size():
    fn = GuidedDenoiser(Denoiser(AnalyticNet(0), parameterization="x"), y=torch.tensor([0, 1]), w=1.0, null_label=K)
    with pytest.raises(ValueError, match="2 labels"):
        fn(torch.zeros(3, C, H, W, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))


# ---- stage 1 ---------------------------------------------------------------------------------------

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


# ---- stage 2: progressive distillation of a w-conditioned model ------------------------------------

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


# ---- label dropout and weights ---------------------------------------------------------------------

def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate():
    y = torch.arange(20000) % K
    out = drop_labels(y, p=0.2, null_label=K, generator=torch.Generator().manual_seed(0))
    dropped = out == K
    assert torch.equal(out[~dropped], y[~dropped])
    rate = dropped.double().mean().item()
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / 20000) ** 0.5, rate
    same = torch.rand(20000, generator=torch.Generator().manual_seed(0)) < 0.2
    assert torch.equal(dropped, same)  # one uniform per label from the generator
    assert torch.equal(drop_labels(y, p=0.0, null_label=K), y)
    with pytest.raises(ValueError, match="p must"):
        drop_labels(y, p=1.0, null_label=K)


def test_teacher_loss_with_label_dropout_trains_the_null_class():
    from pd_core.config import DiffusionConfig
    from pd_core.train.phases import teacher_loss_fn

    seen: list[torch.Tensor] = []

    class Recording(nn.Module):
        def forward(self, z, logsnr, y=None):
            seen.append(y.clone())
            return torch.zeros_like(z)

    fn = teacher_loss_fn(net=Recording(), diffusion_cfg=DiffusionConfig(), generator=torch.Generator().manual_seed(0),
                         label_dropout=0.5, null_label=K)
    y = torch.arange(400) % K
    fn(torch.zeros(400, 1, 2, 2), y)
    assert set(seen[0].tolist()) == {0, 1, 2, K} and 120 < int((seen[0] == K).sum()) < 280
    with pytest.raises(ValueError, match="null label"):
        teacher_loss_fn(net=Recording(), diffusion_cfg=DiffusionConfig(), generator=torch.Generator(),
                        label_dropout=0.1, null_label=None)


def test_guidance_weights_are_uniform_on_their_range():
    w = sample_guidance(40000, w_min=1.0, w_max=5.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(w.min()) >= 1.0 and float(w.max()) <= 5.0
    assert abs(float(w.mean()) - 3.0) < 4 * (16 / 12 / 40000) ** 0.5
    assert abs(float(w.var()) - 16 / 12) < 0.03
    assert torch.equal(sample_guidance(3, w_min=2.0, w_max=2.0), torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="w_min <= w_max"):
        sample_guidance(3, w_min=2.0, w_max=1.0)


def test_class_balanced_labels_cycle_through_the_classes_from_any_start():
    assert class_balanced_labels(start=0, count=7, num_classes=3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert class_balanced_labels(start=5, count=3, num_classes=3).tolist() == [2, 0, 1]
    full = class_balanced_labels(start=0, count=1000, num_classes=10)
    assert torch.bincount(full).tolist() == [100] * 10
