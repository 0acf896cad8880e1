"""The paper's U-Net: shapes, zero-init outputs, conditioning, the CIFAR-10 size."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pd_core.unet import UNet, UNetSpec, guidance_features, paper_cifar10_spec, timestep_embedding


def _tiny(**kw) -> UNetSpec:
    base = dict(in_channels=1, out_channels=1, image_size=8, ch=16, emb_ch=32, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0)
    base.update(kw)
    return UNetSpec(**base)


CONFIGS = {
    "gray8": _tiny(),
    "rgb8_both": _tiny(in_channels=3, out_channels=6, norm_groups=8),
    "gray28_mult122": _tiny(image_size=28, ch_mult=(1, 2, 2), attn_resolutions=(14, 7)),
    "rgb32_both": _tiny(in_channels=3, out_channels=6, image_size=32, ch=8, ch_mult=(1, 2, 2, 2),
                        attn_resolutions=(16,)),
    "rgb32_heads_noresample": _tiny(in_channels=3, out_channels=3, image_size=32, ch=32, ch_mult=(1, 1, 2),
                                    attn_resolutions=(16, 8), head_dim=16, resblock_resample=False),
    "gray8_dropout_2blocks": _tiny(num_res_blocks=2, dropout=0.2),
}


def _perturb(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _inputs(spec: UNetSpec, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, spec.in_channels, spec.image_size, spec.image_size, generator=g)
    lam = torch.linspace(-20, 20, b)
    return z, lam


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shape_finite_and_zero_at_init(name):
    spec = CONFIGS[name]
    torch.manual_seed(0)
    net = UNet(spec).eval()
    z, lam = _inputs(spec)
    out = net(z, lam)
    assert out.shape == (3, spec.out_channels, spec.image_size, spec.image_size)
    assert torch.isfinite(out).all()
    # zero-initialised output conv: the net starts as exactly zero
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(net.conv_out.weight) == 0 and torch.count_nonzero(net.conv_out.bias) == 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nonzero_after_perturbation_and_depends_on_z_and_logsnr(name):
    spec = CONFIGS[name]
    torch.manual_seed(0)
    net = UNet(spec).eval()
    _perturb(net)
    z, lam = _inputs(spec)
    out = net(z, lam)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert not torch.allclose(net(z, lam.flip(0)), out)  # conditioned on logsnr
    assert not torch.allclose(net(z * 0.5, lam), out)


def test_residual_and_attention_branches_zero_init():
    torch.manual_seed(0)
    net = UNet(_tiny(num_res_blocks=2))
    names = [n for n, _ in net.named_parameters() if n.endswith("conv2.weight") or n.endswith("proj.weight")]
    assert len(names) > 5
    params = dict(net.named_parameters())
    for n in names:
        assert torch.count_nonzero(params[n]) == 0, n
    # everything else is not all-zero (the non-zero-init convs got a real init)
    assert torch.count_nonzero(net.conv_in.weight) > 0


def test_output_depends_on_logsnr_through_network_time_input_only_in_range():
    """lambda is clipped to [-20, 20] before the time input (as in the official net)."""
    spec = _tiny()
    torch.manual_seed(0)
    net = UNet(spec).eval()
    _perturb(net)
    z, _ = _inputs(spec, b=2)
    a = net(z, torch.tensor([20.0, -20.0]))
    b = net(z, torch.tensor([35.0, -50.0]))
    torch.testing.assert_close(a, b)


def test_class_conditioning_changes_output():
    spec = _tiny(num_classes=5)
    torch.manual_seed(0)
    net = UNet(spec).eval()
    z, lam = _inputs(spec, b=2)
    z = z[:1].expand(2, -1, -1, -1)
    lam = lam[:1].expand(2)
    y = torch.tensor([0, 3])
    assert torch.count_nonzero(net(z, lam, y)) == 0  # still zero at init
    _perturb(net)
    out = net(z, lam, y)
    assert not torch.allclose(out[0], out[1])  # same z and logsnr, different labels
    same = net(z, lam, torch.tensor([3, 3]))
    torch.testing.assert_close(same[0], same[1])
    torch.testing.assert_close(same[1], out[1])
    with pytest.raises(ValueError, match=r"\by\b"):
        net(z, lam)


def test_dropout_active_only_in_train_mode():
    spec = _tiny(dropout=0.5)
    torch.manual_seed(0)
    net = UNet(spec)
    _perturb(net)
    z, lam = _inputs(spec)
    net.eval()
    torch.testing.assert_close(net(z, lam), net(z, lam))
    net.train()
    assert not torch.allclose(net(z, lam), net(z, lam))


def test_batch_independence():
    """GroupNorm (not BatchNorm): each example's output does not depend on the rest of the batch."""
    spec = _tiny()  # dropout 0, so train mode is deterministic and batch statistics would show
    torch.manual_seed(0)
    net = UNet(spec).train()
    _perturb(net)
    z, lam = _inputs(spec, b=4)
    full = net(z, lam)
    torch.testing.assert_close(net(z[1:2], lam[1:2]), full[1:2], rtol=1e-5, atol=1e-6)


def test_moves_between_dtypes_and_devices():
    """nn.Module.to / .double() must work (the net is moved to the GPU in training)."""
    spec = _tiny()
    torch.manual_seed(0)
    net = UNet(spec).eval()
    _perturb(net)
    z, lam = _inputs(spec)
    out32 = net(z, lam)
    net64 = copy.deepcopy(net).to("cpu").double()
    out64 = net64(z.double(), lam.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter_after_perturbation():
    spec = _tiny(num_classes=3)
    torch.manual_seed(0)
    net = UNet(spec)
    _perturb(net)
    z, lam = _inputs(spec)
    net(z, lam, torch.tensor([0, 1, 2])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def _np_count_paper_cifar10() -> int:
    """Parameter count of the official CIFAR-10 net, by hand: ch 256, emb 1024, 3 levels of 32/16/8,
    3 res blocks per level down, 4 up, BigGAN up/down res blocks, attention at 16 and 8 and in the middle."""
    ch, emb = 256, 1024

    def conv(i, o, k):
        return i * o * k * k + o

    def norm(c):
        return 2 * c

    def res(i, o):
        return (norm(i) + conv(i, o, 3) + (emb * 2 * o + 2 * o) + norm(o) + conv(o, o, 3)
                + (conv(i, o, 1) if i != o else 0))

    attn = norm(ch) + conv(ch, 3 * ch, 1) + conv(ch, ch, 1)
    time_mlp = (ch * emb + emb) + (emb * emb + emb)
    down = 3 * 3 * res(ch, ch) + 2 * res(ch, ch) + 6 * attn  # 9 blocks + 2 downsample blocks, attn at 16 and 8
    mid = 2 * res(ch, ch) + attn
    up = 3 * 4 * res(2 * ch, ch) + 2 * res(ch, ch) + 8 * attn  # every up block takes a 256-ch skip
    io = conv(3, ch, 3) + norm(ch) + conv(ch, 3, 3)
    return time_mlp + down + mid + up + io


def test_paper_cifar10_spec_constructs_with_plausible_size():
    spec = paper_cifar10_spec()
    assert (spec.ch, spec.emb_ch, spec.ch_mult, spec.num_res_blocks, spec.image_size) == (256, 1024, (1, 1, 1), 3, 32)
    assert set(spec.attn_resolutions) == {16, 8} and spec.resblock_resample and spec.dropout == 0.2
    net = UNet(spec)
    n = sum(p.numel() for p in net.parameters())
    print(f"paper CIFAR-10 U-Net parameters: {n:,} ({n / 1e6:.2f}M)")
    assert 40e6 <= n <= 65e6
    assert n == _np_count_paper_cifar10()
    assert paper_cifar10_spec(out_channels=6).out_channels == 6


@pytest.mark.parametrize("kw,field", [
    (dict(image_size=30, ch_mult=(1, 2, 2)), "image_size"),  # 30 not divisible by 4
    (dict(image_size=12, ch_mult=(1, 2, 2, 2)), "image_size"),  # 12 not divisible by 8
    (dict(ch_mult=()), "ch_mult"),
    (dict(in_channels=0), "in_channels"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_spec_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        _tiny(**kw)


def test_bad_input_shape_raises():
    net = UNet(_tiny())
    with pytest.raises(ValueError, match=r"\bz\b"):
        net(torch.zeros(2, 3, 8, 8), torch.zeros(2))  # wrong channel count
    with pytest.raises(ValueError, match=r"\bz\b"):
        net(torch.zeros(2, 1, 7, 7), torch.zeros(2))  # 7 not divisible by 2
    with pytest.raises(ValueError, match=r"\bz\b"):
        net(torch.zeros(2, 1, 8, 4), torch.zeros(2))  # not square
    with pytest.raises(ValueError, match=r"\bz\b"):
        net(torch.zeros(2, 1, 8), torch.zeros(2))


def test_null_class_is_one_more_embedding_row_and_a_label_like_any_other():
    spec = _tiny(num_classes=3, null_class=True)
    torch.manual_seed(0)
    net = UNet(spec).eval()
    assert net.class_emb.weight.shape == (4, spec.emb_ch)
    assert UNet(_tiny(num_classes=3)).class_emb.weight.shape == (3, spec.emb_ch)
    _perturb(net)
    z, lam = _inputs(spec, b=2)
    z, lam = z[:1].expand(2, -1, -1, -1), lam[:1].expand(2)
    out = net(z, lam, torch.tensor([3, 1]))  # 3 = the null class
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="null_class"):
        _tiny(null_class=True)


def test_guidance_embedding_starts_at_zero_so_the_net_starts_as_its_teacher():
    """A net that gains the guidance embedding, loaded with its teacher's weights, computes the teacher's output
    at every w; once trained (perturbed), w changes the output."""
    teacher_spec = _tiny(num_classes=3, null_class=True)
    torch.manual_seed(0)
    teacher = UNet(teacher_spec).eval()
    _perturb(teacher)
    student = UNet(dataclasses.replace(teacher_spec, guidance_embedding=True)).eval()
    fresh = student.state_dict()
    assert set(fresh) - set(teacher.state_dict()) == {k for k in fresh if k.startswith("guide_mlp.")}
    student.load_state_dict({**fresh, **teacher.state_dict()})
    z, lam = _inputs(teacher_spec, b=4)
    y = torch.tensor([0, 1, 2, 0])
    want = teacher(z, lam, y)
    for w in (0.0, 1.0, 7.5):
        torch.testing.assert_close(student(z, lam, y, torch.full((4,), w)), want, rtol=0, atol=0)
    _perturb(student, seed=1)
    a, b = student(z, lam, y, torch.zeros(4)), student(z, lam, y, torch.full((4,), 2.0))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"\bw\b"):
        student(z, lam, y)


def test_guidance_features_tell_weights_apart_at_every_scale():
    f = guidance_features(torch.tensor([0.0, 0.01, 1.0, 1.01, 4.0]), 32)
    assert f.shape == (5, 32)
    assert (f[0] - f[1]).abs().max() > 0.5  # a 0.01 change moves the highest frequencies (100 rad per unit w)
    assert (f[2] - f[3]).abs().max() > 0.5
    assert (f[0] - f[4]).abs().max() > 0.5
    torch.testing.assert_close(f[0], timestep_embedding(torch.zeros(1), 32)[0])


def test_the_guidance_gate_extrapolates_the_label_embedding_from_the_null_class_and_leaves_null_alone():
    """With g(w) = c and h(w) = 0, emb gets E[y] + c (E[y] - E[null]): the teacher with class row y replaced by
    (1 + c) E[y] - c E[null]; for y = null the gate has nothing to scale."""
    teacher_spec = _tiny(num_classes=3, null_class=True)
    torch.manual_seed(0)
    teacher = UNet(teacher_spec).eval()
    _perturb(teacher)
    student = UNet(dataclasses.replace(teacher_spec, guidance_embedding=True)).eval()
    student.load_state_dict({**student.state_dict(), **teacher.state_dict()})
    c, emb_ch = 0.7, teacher_spec.emb_ch
    with torch.no_grad():  # last Dense: weight 0, bias [c ... c | 0 ... 0] -> gate c, shift 0 at every w
        student.guide_mlp[2].bias.copy_(torch.cat([torch.full((emb_ch,), c), torch.zeros(emb_ch)]))
        extrapolated = UNet(teacher_spec).eval()
        extrapolated.load_state_dict(teacher.state_dict())
        table = extrapolated.class_emb.weight
        table[:3] = (1 + c) * table[:3] - c * table[3]
    z, lam = _inputs(teacher_spec, b=4)
    y, w = torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    got = student(z, lam, y, w)
    torch.testing.assert_close(got[:3], extrapolated(z[:3], lam[:3], y[:3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3:], teacher(z[3:], lam[3:], y[3:]), rtol=1e-5, atol=1e-5)
