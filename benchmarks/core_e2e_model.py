"""The 2-D end-to-end check's settings and networks (benchmarks/core_e2e.py): an MLP denoiser, its teacher
training and one round of progressive distillation.

The MLP maps (z (B, 2, 1, 1), lambda (B,)) to (B, 2, 1, 1), with the time input phi(lambda) through the U-Net's
sinusoidal embedding. The teacher minimises pd_core.losses.TeacherLoss (t ~ U[0, 1), the configured weighting)
with AdamW, its learning rate scaled by min(1, (k + 1) / 200) (1 - k / updates) at update k, grad clip 1, and is
sampled through its EMA (decay 0.995). A round (Algorithm 2) starts the student from a copy of its teacher and
minimises pd_core.distill.DistillationLoss for N = ``student_steps`` with a fresh AdamW, its learning rate
linearly annealed to 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.core_e2e_data import sample_data
from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss
from pd_core.losses import TeacherLoss
from pd_core.schedule import network_time_input
from pd_core.unet import timestep_embedding


@dataclass(frozen=True)
class E2EConfig:
    seed: int = 0
    parameterization: str = "x"  # the paper's CIFAR-10 choice
    weighting: str = "snr_trunc"  # truncated SNR (the paper's default)
    hidden: int = 128  # MLP width
    teacher_updates: int = 4000
    teacher_lr: float = 2e-3
    teacher_steps: int = 64  # the teacher's DDIM step count that round 1 distills (2N)
    final_steps: int = 1
    updates_per_round: int = 1500
    distill_lr: float = 1e-3  # linearly annealed to 0 over each round
    batch_size: int = 512
    eval_samples: int = 2000  # generated points per evaluation, and fresh data points to compare with
    heun_baseline: bool = True  # also evaluate the teacher's Heun ODE sampler (2N - 1 evals) at each N
    threads: int = 1  # 1 thread: tiny MLPs are overhead-bound; more threads only contend



class MLPNet(nn.Module):
    """net(z (B, 2, 1, 1), logsnr (B,)) -> (B, 2, 1, 1); time input phi(lambda) as in the U-Net."""

    def __init__(self, hidden: int = 128, emb: int = 32):
        super().__init__()
        self.emb = emb
        self.time = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(2, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        b = z.shape[0]
        temb = timestep_embedding(network_time_input(logsnr), self.emb).to(z.dtype)  # (B, emb)
        h = self.inp(z.reshape(b, 2)) + self.time(temb)  # (B, hidden)
        return self.body(h).reshape(b, 2, 1, 1)  # (B, 2, 1, 1)


def _adamw(net: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)


def train_teacher(cfg: E2EConfig, *, generator: torch.Generator) -> Denoiser:
    net = MLPNet(cfg.hidden)
    model = Denoiser(net, parameterization=cfg.parameterization)
    loss_fn = TeacherLoss(weighting=cfg.weighting)
    opt = _adamw(net, cfg.teacher_lr)
    ema = copy.deepcopy(net).requires_grad_(False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 200) * (1 - k / cfg.teacher_updates))
    for _ in range(cfg.teacher_updates):
        x = sample_data(cfg.batch_size, generator=generator)
        loss = loss_fn(model, x, generator=generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - 0.995)
    return Denoiser(ema.eval(), parameterization=cfg.parameterization)


def distill_round(teacher: Denoiser, *, student_steps: int, cfg: E2EConfig, generator: torch.Generator) -> Denoiser:
    """One round of Algorithm 2: student (copy of the teacher, fresh AdamW) learns N = student_steps."""
    net = copy.deepcopy(teacher.net).train().requires_grad_(True)
    student = Denoiser(net, parameterization=cfg.parameterization)
    loss_fn = DistillationLoss(teacher, num_steps=student_steps, weighting=cfg.weighting)
    opt = _adamw(net, cfg.distill_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / cfg.updates_per_round)
    for _ in range(cfg.updates_per_round):
        x = sample_data(cfg.batch_size, generator=generator)
        loss = loss_fn(student, x, generator=generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return Denoiser(net.eval().requires_grad_(False), parameterization=cfg.parameterization)
