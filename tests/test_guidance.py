"""Classifier-free guidance against float64 numpy references: the guided combination for every parameterization,
and what a guided denoiser refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core.denoiser import Denoiser
from pd_core.guidance import (
    GuidedDenoiser,
    guided,
    guided_combination,
)
from pd_core.unet import UNetSpec
from tests.guidance_reference import PARAMETERIZATIONS, AnalyticNet, C, H, K, W, _batch, _rel_err, np_guided
from tests.reference import np_alpha_sigma


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
