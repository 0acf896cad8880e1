"""DDIM over a discrete (DDPM-table) schedule equals diffusers' DDIMScheduler, and Algorithm 2 holds on it.

The network is a fixed smooth function of (z, timestep) standing in for a model trained in discrete
time; ours sees it through the Denoiser interface (z, logsnr), the timestep recovered with
``DiscreteSchedule.timestep``, exactly as an imported teacher is run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pd_core import distill, samplers, schedule
from pd_core.denoiser import Denoiser

diffusers = pytest.importorskip("diffusers")

KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}


class ToyNet(nn.Module):
    """out = tanh(W z + b) (0.5 + 0.5 cos(tau / 300)): any smooth function of (z, timestep) will do."""

    def __init__(self, channels: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(channels, channels, generator=g, dtype=torch.float64) * 0.8)
        self.b = nn.Parameter(torch.randn(channels, generator=g, dtype=torch.float64) * 0.1)

    def at_timestep(self, z: Tensor, tau: Tensor) -> Tensor:
        h = torch.einsum("oc,bchw->bohw", self.w, z) + self.b[None, :, None, None]
        return torch.tanh(h) * (0.5 + 0.5 * torch.cos(tau.to(z.dtype) / 300.0))[:, None, None, None]


class OnLogsnr(nn.Module):
    """The toy net behind the Denoiser interface: net(z, logsnr) = toy(z, timestep(logsnr))."""

    def __init__(self, toy: ToyNet, sched: schedule.DiscreteSchedule):
        super().__init__()
        self.toy, self.sched = toy, sched

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        return self.toy.at_timestep(z, self.sched.timestep(logsnr).double())


def diffusers_scheduler(beta_schedule: str, prediction_type: str = "epsilon", num_train_timesteps: int = 1000):
    return diffusers.DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                   clip_sample=False, set_alpha_to_one=True, prediction_type=prediction_type,
                                   timestep_spacing="trailing")


def diffusers_ddim(toy: ToyNet, z: Tensor, *, steps: int, beta_schedule: str, prediction_type: str,
                   num_train_timesteps: int = 1000) -> Tensor:
    sched = diffusers_scheduler(beta_schedule, prediction_type, num_train_timesteps)
    sched.set_timesteps(steps)
    x = z.clone()
    for tau in sched.timesteps:
        out = toy.at_timestep(x, torch.full((x.shape[0],), float(tau), dtype=torch.float64))
        x = sched.step(out, int(tau), x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", list(KINDS))
@pytest.mark.parametrize("beta_schedule", schedule.BETA_SCHEDULES)
@pytest.mark.parametrize(("big_t", "steps"), [(1000, n) for n in (1, 2, 7, 8, 16, 50, 64)]
                         + [(100, n) for n in (3, 6, 8, 16)])
@torch.no_grad()
def test_our_ddim_equals_diffusers_ddim_trailing_at_every_step_count(big_t, steps, beta_schedule, prediction_type):
    toy = ToyNet()
    # the teacher's own table, as an import reads it from the model's scheduler (diffusers keeps it in float32)
    sched = schedule.DiscreteSchedule(diffusers_scheduler(beta_schedule, num_train_timesteps=big_t).alphas_cumprod)
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = samplers.ddim(Denoiser(OnLogsnr(toy, sched), parameterization=KINDS[prediction_type]), z,
                         num_steps=steps, clip=False, schedule=sched)
    ref = diffusers_ddim(toy, z, steps=steps, beta_schedule=beta_schedule, prediction_type=prediction_type,
                         num_train_timesteps=big_t)
    assert ours.shape == ref.shape
    # 1e-4, relative where an eps teacher's unclipped x_hat at alpha_bar ~ 2e-9 reaches 1e4 (diffusers computes
    # its alphas in float32, we in float64: the two agree to ~1e-8 relative there)
    np.testing.assert_allclose(ours.numpy(), ref.double().numpy(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("kind", ["eps", "v", "x"])
@pytest.mark.parametrize("n", [1, 2, 4, 16, 32])
@torch.no_grad()
def test_one_student_step_on_x_tilde_lands_on_two_teacher_steps_of_diffusers_ddim(n, kind):
    """Checked against diffusers' own DDIMScheduler steps (2N for the teacher, N for the student), whose
    previous timestep tau - T // N is not the next trailing timestep when N does not divide T (16, 32)."""
    prediction = {v: k for k, v in KINDS.items()}[kind]
    sched = schedule.DiscreteSchedule(schedule.ddpm_alphas_cumprod(beta_schedule="scaled_linear"))
    toy = ToyNet()
    teacher = Denoiser(OnLogsnr(toy, sched), parameterization=kind)
    z = torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = (torch.arange(n, dtype=torch.float64) + 1) / n  # every student time, i = 0 .. N - 1
    x_tilde = distill.distillation_target(teacher, z=z, t=t, num_steps=n, schedule=sched)
    two = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, prediction_type=prediction,
                                  timestep_spacing="trailing")
    one = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, prediction_type="sample",
                                  timestep_spacing="trailing")
    two.alphas_cumprod = one.alphas_cumprod = sched.alphas_cumprod  # the same table in float64
    two.set_timesteps(2 * n)
    one.set_timesteps(n)
    for i in range(n):
        zi, k = z[i:i + 1], 2 * (n - 1 - i)  # the student's time (i + 1) / N is the teacher's index k
        taus = two.timesteps[k:k + 2]
        z_mid = two.step(toy.at_timestep(zi, taus[:1].double()), int(taus[0]), zi).prev_sample
        z_two = two.step(toy.at_timestep(z_mid, taus[1:].double()), int(taus[1]), z_mid).prev_sample
        z_one = one.step(x_tilde[i:i + 1], int(one.timesteps[n - 1 - i]), zi).prev_sample
        np.testing.assert_allclose(z_one.numpy(), z_two.numpy(), rtol=0, atol=1e-9)
