"""Progressive distillation (Algorithm 2): the two-step DDIM target and the student's loss.

Student with N steps, teacher with 2N. For t = (i + 1) / N, t' = t - 0.5/N, t'' = t - 1/N:
    z_t'  = alpha_t'  x_hat(z_t, t)   + sigma_t'  eps_hat(z_t, t)        (teacher, NO clipping)
    z_t'' = alpha_t'' x_hat(z_t', t') + sigma_t'' eps_hat(z_t', t')
    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
and for i = 0 (the student's last step, which returns x_hat) x_tilde = x_hat(z_t', t').
Each step lands where the sampler's DDIM step does (:func:`schedule.ddim_destination`): t' and t''
above on a continuous schedule; on a discrete one diffusers' rule tau(t) - T // (2N) for the
teacher's steps and tau(t) - T // N in x_tilde (the student's step), which is the same when N
divides T; a destination at the clean end (lambda = +inf: alpha = 1, sigma = 0) makes the formula
x_tilde = z_t'' (= x_hat(z_t', t') when the teacher's second step ends there too).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core._checks import broadcast_to, check_batch_vector, check_image_batch, check_num_steps
from pd_core.denoiser import Denoiser, DenoiserFn
from pd_core.schedule import COSINE, Schedule, alpha_sigma, ddim_destination
from pd_core.weighting import check_combination, per_example_loss


def _check_student_times(t: Tensor, *, num_steps: int) -> Tensor:
    """Return i = t N - 1 as integers, refusing t not on the grid {1/N, ..., 1}."""
    i_float = t.double() * num_steps - 1.0
    i = torch.round(i_float)
    if bool(((i_float - i).abs() > 1e-4).any()) or bool((i < 0).any()) or bool((i > num_steps - 1).any()):
        raise ValueError(f"t must take values in {{1/N, ..., 1}} with N = num_steps = {num_steps}; "
                         f"got values in [{t.min().item()}, {t.max().item()}]")
    return i.long()


def ddim_step(*, x_hat: Tensor, eps_hat: Tensor, logsnr_s: Tensor) -> Tensor:
    """z_s = alpha_s x_hat + sigma_s eps_hat."""
    alpha_s, sigma_s = (broadcast_to(v, x_hat) for v in alpha_sigma(logsnr_s))
    return alpha_s * x_hat + sigma_s * eps_hat


def distillation_target(teacher: DenoiserFn, *, z: Tensor, t: Tensor, num_steps: int,
                        schedule: Schedule = COSINE) -> Tensor:
    """x_tilde of Algorithm 2 (see module docstring); ``num_steps`` is the STUDENT's N, t in {1/N, ..., 1}."""
    check_num_steps("num_steps", num_steps)
    check_image_batch("z", z)
    check_batch_vector("t", t, batch=z.shape[0])
    _check_student_times(t, num_steps=num_steps)
    t = t.to(z.dtype)
    return _two_step_target(teacher, z=z, t=t, lam_t=schedule.logsnr(t), num_steps=num_steps,
                            schedule=schedule)


def _two_step_target(teacher: DenoiserFn, *, z: Tensor, t: Tensor, lam_t: Tensor, num_steps: int,
                     schedule: Schedule) -> Tensor:
    """:func:`distillation_target` for a valid grid t (no checks: no host syncs), lam_t = lambda(t) given."""
    t_mid = (t - 0.5 / num_steps).clamp(min=0.0)
    lam_mid = schedule.logsnr_unchecked(t_mid)  # the teacher's second evaluation, on its grid
    x_hat, eps_hat = teacher(z, lam_t)
    z_mid = ddim_step(x_hat=x_hat, eps_hat=eps_hat, logsnr_s=ddim_destination(schedule, t, num_steps=2 * num_steps))
    x_mid, eps_mid = teacher(z_mid, lam_mid)
    z_s = ddim_step(x_hat=x_mid, eps_hat=eps_mid, logsnr_s=ddim_destination(schedule, t_mid, num_steps=2 * num_steps))

    lam_s = ddim_destination(schedule, t, num_steps=num_steps)  # where the student's one step lands
    alpha_t, sigma_t = (broadcast_to(v, z) for v in alpha_sigma(lam_t))
    alpha_s, sigma_s = (broadcast_to(v, z) for v in alpha_sigma(lam_s))
    ratio = sigma_s / sigma_t
    x_tilde = (z_s - ratio * z) / (alpha_s - ratio * alpha_t)
    return x_tilde  # = z_s = x_mid at the student's last step (lambda_s = +inf: alpha_s = 1, sigma_s = 0)


class DistillationLoss:
    """Per-example student loss w(lambda_t) ||x_hat_student(z_t) - x_tilde||^2 (no clipping anywhere).

    i ~ U{0..N-1}, t = (i + 1)/N, z_t = alpha_t x + sigma_t eps; the teacher runs without gradients.
    """

    def __init__(self, teacher: Denoiser, *, num_steps: int, weighting: str, schedule: Schedule = COSINE):
        check_num_steps("num_steps", num_steps)
        self.teacher = teacher
        self.num_steps = num_steps
        self.weighting = weighting
        self.schedule = schedule

    def targets(self, x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Sample (z_t, lambda_t, x_tilde) for a data batch; the teacher runs without gradients.

        Hot path: t is on the grid by construction, so nothing is checked on the host (no GPU
        sync) and lambda_t is computed once. ``no_grad`` rather than ``inference_mode``: the target
        then needs no copy to enter the student's autograd graph (the cost is the same).
        """
        check_image_batch("x", x)
        n = self.num_steps
        i = torch.randint(0, n, (x.shape[0],), device=x.device, generator=generator)  # (B,)
        t = (i + 1).to(x.dtype) / n
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        lam = self.schedule.logsnr_unchecked(t)
        alpha, sigma = (broadcast_to(v, x) for v in alpha_sigma(lam))
        z = alpha * x + sigma * eps
        with torch.no_grad():
            x_tilde = _two_step_target(self.teacher, z=z, t=t, lam_t=lam, num_steps=n,
                                       schedule=self.schedule)
        return z, lam, x_tilde.float()

    def __call__(self, student: Denoiser, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        check_combination(parameterization=student.parameterization, weighting=self.weighting)
        z, lam, x_tilde = self.targets(x, generator=generator)
        x_hat, _ = student(z, lam)
        return per_example_loss(x_hat=x_hat.float(), x=x_tilde, logsnr=lam.float(), kind=self.weighting)
