"""bf16 autocast on the CPU: when ``runtime.precision`` picks it, and how close it stays to fp32.

The tolerances are 2.5-5x the differences measured on the smoke U-Net with weights perturbed
from their initialisation (this machine, torch 2.13): network output relative RMS 1.6-1.9e-2;
teacher loss (batch mean) relative 1.6-3.4e-3; distillation loss relative 3.9-7.1e-3; DDIM samples
(8 steps) mean absolute difference 7.2-8.1e-3 on [-1, 1]; over 40 training updates (three initialisations),
per-step losses within 2e-2, the mean of the last 10 within 1.3e-2, and the total weight change within
5.3e-2 of fp32's (relative).
Each test also checks that bf16 really ran (the results are not bitwise fp32's), so none can pass
by autocast being silently off.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pd_core import evaluation, samplers
from pd_core.architecture import PdUNet
from pd_core.config import RuntimeConfig, load_config
from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss
from pd_core.models import LoadedModel
from pd_core.schedule import COSINE, alpha_sigma
from pd_core.train import Runtime, TrainState, distill_loss_fn, resolve_runtime, teacher_loss_fn, train_step
from pd_core.train.runtime import autocast_dtype_for, cpu_flags, cpu_supports_bf16
from pd_core.unet import UNet, unet_spec

CPU = torch.device("cpu")
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 amx_tile
bogomips\t: 4200.00

processor\t: 1
flags\t\t: fpu vme
"""


def _runtime(bf16: bool) -> Runtime:
    return Runtime(device=CPU, autocast_dtype=torch.bfloat16 if bf16 else None, channels_last=False, compile=False)


@pytest.fixture(scope="module")
def smoke():
    """The smoke preset's U-Net with every weight perturbed (its output layer starts at zero), and a batch."""
    cfg = load_config(preset="smoke")
    spec = unet_spec(cfg, in_channels=1, dropout=0.0)
    torch.manual_seed(0)
    net = UNet(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return cfg, net, x


def test_cpu_flags_come_from_the_first_processor_and_name_bf16_support(tmp_path):
    assert {"avx512_bf16", "amx_tile", "avx512f"} <= cpu_flags(CPUINFO)
    assert cpu_flags("processor : 0\n") == frozenset()
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text(CPUINFO)
    without.write_text(CPUINFO.replace("avx512_bf16", "avx512vl"))
    assert cpu_supports_bf16(with_bf16)
    assert not cpu_supports_bf16(without)  # avx512f alone emulates bf16: not native
    assert not cpu_supports_bf16(tmp_path / "missing")  # nothing says: never assumed


def test_auto_precision_is_bf16_on_gpus_and_on_cpus_with_native_bf16_only():
    cuda = torch.device("cuda")
    assert autocast_dtype_for("auto", device=CPU, cpu_bf16=True) is torch.bfloat16
    assert autocast_dtype_for("auto", device=CPU, cpu_bf16=False) is None
    assert autocast_dtype_for("auto", device=cuda, cpu_bf16=False) is torch.bfloat16
    for device in (CPU, cuda):
        assert autocast_dtype_for("fp32", device=device, cpu_bf16=True) is None  # the switch back to fp32
        assert autocast_dtype_for("bf16", device=device, cpu_bf16=False) is torch.bfloat16


def test_resolved_runtime_follows_this_cpu_and_fp32_turns_autocast_off():
    auto = resolve_runtime(RuntimeConfig(device="cpu", precision="auto"))
    assert auto.autocast_dtype is (torch.bfloat16 if cpu_supports_bf16() else None)
    assert resolve_runtime(RuntimeConfig(device="cpu", precision="fp32")).autocast_dtype is None
    assert resolve_runtime(RuntimeConfig(device="cpu", precision="bf16")).autocast_dtype is torch.bfloat16
    assert not auto.channels_last  # slower on CPUs, with bf16 too


def test_bf16_network_outputs_and_losses_are_finite_and_close_to_fp32(smoke):
    cfg, net, x = smoke
    z = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    lam = torch.linspace(-5.0, 5.0, 16)
    out: dict[bool, dict[str, torch.Tensor]] = {}
    for bf16 in (False, True):
        with torch.no_grad(), _runtime(bf16).autocast():
            raw = net(z, lam)
            teacher = teacher_loss_fn(net=net, diffusion_cfg=cfg.diffusion, generator=torch.Generator().manual_seed(2))
            distill = distill_loss_fn(net=net, teacher_net=copy.deepcopy(net).eval(), student_steps=4,
                                      diffusion_cfg=cfg.diffusion, schedule=COSINE,
                                      generator=torch.Generator().manual_seed(2))
            out[bf16] = {"raw": raw.float(), "teacher": teacher(x, None), "distill": distill(x, None)}
    assert out[True]["raw"].dtype == torch.float32 and out[False]["raw"].std() > 0.1
    for name in ("teacher", "distill"):
        assert out[True][name].dtype == torch.float32 and torch.isfinite(out[True][name]).all()
    rms = (out[True]["raw"] - out[False]["raw"]).norm() / out[False]["raw"].norm()
    assert 1e-4 < rms < 0.05  # bf16 ran (not bitwise fp32), and stays within 5% RMS
    for name, tol in (("teacher", 0.01), ("distill", 0.02)):
        rel = (out[True][name].mean() - out[False][name].mean()).abs() / out[False][name].mean()
        assert rel < tol, (name, float(rel))


def test_the_distillation_target_arithmetic_stays_fp32_under_bf16_autocast(smoke):
    """The teacher's two forwards run in bf16; from their (fp32-cast) outputs on, the two-step target is
    computed in fp32: it matches a float64 recomputation from the same outputs to 1e-5 (measured 5.5e-7),
    where bf16 arithmetic would be off by about 3e-2."""
    _, net, x = smoke
    denoiser, outputs, n = Denoiser(net.eval(), parameterization="x"), [], 4

    def teacher(z, lam):
        x_hat, eps_hat = denoiser(z, lam)
        outputs.append((x_hat, eps_hat))
        return x_hat, eps_hat

    loss = DistillationLoss(teacher, num_steps=n, weighting="snr_trunc")
    with torch.no_grad(), _runtime(True).autocast():
        z, lam, target = loss.targets(x, generator=torch.Generator().manual_seed(3))
    assert all(t.dtype == torch.float32 for pair in outputs for t in pair)
    i = torch.randint(0, n, (16,), generator=torch.Generator().manual_seed(3)).view(-1, 1, 1, 1)  # the same draw
    x_mid, eps_mid = (t.double() for t in outputs[1])
    alpha_s, sigma_s = alpha_sigma(COSINE.logsnr(i.double() / n))
    alpha_t, sigma_t = alpha_sigma(lam.double().view(-1, 1, 1, 1))
    z_s = alpha_s * x_mid + sigma_s * eps_mid
    ratio = sigma_s / sigma_t
    reference = torch.where(i == 0, x_mid, (z_s - ratio * z.double()) / (alpha_s - ratio * alpha_t))
    assert target.dtype == torch.float32 and bool((i == 0).any()) and bool((i > 0).any())
    assert (target.double() - reference).abs().max() < 1e-5
    with torch.no_grad():
        fp32_target = loss.targets(x, generator=torch.Generator().manual_seed(3))[2]
    assert not torch.equal(target, fp32_target)  # the teacher did run in bf16


@pytest.mark.slow
def test_forty_bf16_training_updates_track_fp32(smoke):
    cfg, _, _ = smoke
    from pd_core.data import load_split

    data = load_split(cfg.data, split="train").images  # (1497, 1, 8, 8)
    torch.manual_seed(1)
    init = UNet(unet_spec(cfg, in_channels=1, dropout=0.0))
    losses, moved = {}, {}
    for bf16 in (False, True):
        net = copy.deepcopy(init).train()
        state = TrainState(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), ema=None, step=0,
                           noise_generator=torch.Generator().manual_seed(0))
        loss_fn = teacher_loss_fn(net=net, diffusion_cfg=cfg.diffusion, generator=state.noise_generator)
        params = list(net.parameters())
        losses[bf16] = torch.tensor([float(train_step(state=state, loss_fn=loss_fn, x=data[k * 64 % 1408:][:64],
                                                      y=None, lr=1e-3, runtime=_runtime(bf16), params=params,
                                                      grad_clip=1.0)) for k in range(40)])
        moved[bf16] = torch.cat([(p - q).flatten() for p, q in zip(params, init.parameters(), strict=True)]).detach()
    assert torch.isfinite(losses[True]).all()
    per_step = (losses[True] - losses[False]).abs() / losses[False]
    assert 0 < per_step.max() < 0.1
    assert abs(losses[True][-10:].mean() / losses[False][-10:].mean() - 1) < 0.04
    assert (moved[True] - moved[False]).norm() / moved[False].norm() < 0.15


def test_bf16_evaluation_samples_are_fp32_images_close_to_fp32_sampling(smoke):
    _, net, _ = smoke
    model = LoadedModel(denoiser=Denoiser(copy.deepcopy(net).eval(), parameterization="x"), manifest={}, steps=8,
                        schedule=COSINE, architecture=PdUNet(net.spec))
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    images = {dtype: evaluation.make_sample_fn(model, sampler="ddim", steps=8, gamma=None, seed=0, device=CPU,
                                               autocast_dtype=dtype)(noise)
              for dtype in (None, torch.bfloat16)}
    with torch.inference_mode():
        reference = samplers.ddim(model.denoiser, noise, num_steps=8, schedule=COSINE)
    assert torch.equal(images[None], reference)  # fp32: exactly the plain sampler
    assert images[torch.bfloat16].dtype == torch.float32
    diff = (images[torch.bfloat16] - images[None]).abs()
    assert 0 < diff.mean() < 0.03 and diff.max() < 0.3
