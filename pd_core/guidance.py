"""Classifier-free guidance and stage 1 of its distillation (Meng et al., "On Distillation of Guided
Diffusion Models", CVPR 2023).

Guided model of a class-conditional net trained with label dropout (the null class is the label K
= num_classes, "no class"), for a guidance weight w >= 0:
    x_hat_w(z_t, c)   = (1 + w) x_hat(z_t, c)   - w x_hat(z_t, null)
    eps_hat_w(z_t, c) = (1 + w) eps_hat(z_t, c) - w eps_hat(z_t, null)
Both are combined. Every parameterization gives eps_hat = (z_t - alpha_t x_hat) / sigma_t, an affine
map of x_hat whose coefficients in the combination sum to one, so eps_hat_w = (z_t - alpha_t x_hat_w)
/ sigma_t: combining the eps of an eps-teacher or the x (or v) of an x- or v-teacher is the same
guided model. w = 0 is the conditional model itself. The guided model costs two network calls,
made as one call on the doubled batch [(z_t, c), (z_t, null)].

Label dropout (teacher training): each label is replaced by the null class with probability p, so
one network learns x_hat(z_t, c) and x_hat(z_t, null).

Stage 1: a student x_hat_eta(z_t, c, w) that also takes w (pd_core.unet's guidance embedding) learns
the guided teacher over time and weights:
    min_eta E_{(x, c) ~ data, t ~ U[t_min, 1), w ~ U[w_min, w_max], eps ~ N(0, I)}
        weight(lambda_t) || x_hat_eta(z_t, c, w) - x_hat_w(z_t, c) ||^2,   z_t = alpha_t x + sigma_t eps,
(t_min = 0 on a continuous schedule, 1/T on a discrete teacher's: from its first training timestep on)
with the pipeline's loss weighting over the x-error and the teacher's two calls without gradients.
One student call then replaces two teacher calls. Stage 2 is progressive distillation of this
student (pd_core.distill) with c and w as inputs of teacher and student.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core._checks import broadcast_to, check_image_batch
from pd_core.architecture import Architecture, as_architecture
from pd_core.denoiser import Denoiser, DenoiserFn
from pd_core.schedule import COSINE, Schedule, alpha_sigma
from pd_core.unet import UNetSpec
from pd_core.weighting import check_combination, per_example_loss


def _check_labels(y: Tensor, *, batch: int) -> None:
    if y.shape != (batch,) or y.dtype != torch.int64:
        raise ValueError(f"y must be int64 class labels of shape ({batch},); got {y.dtype} {tuple(y.shape)}")


def guided_combination(*, conditional: Tensor, unconditional: Tensor, w: Tensor) -> Tensor:
    """(1 + w) conditional - w unconditional, with w (B,) broadcast over each example."""
    w = broadcast_to(w.to(conditional.dtype), conditional)  # (B, 1, 1, 1)
    return (1.0 + w) * conditional - w * unconditional


def guided_forward(both: Denoiser, *, z: Tensor, logsnr: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(x_hat_w, eps_hat_w) of one batched call: ``both`` sees [z; z] with the conditional inputs first and the
    unconditional ones second, and each output is (1 + w) conditional - w unconditional."""
    b = z.shape[0]
    x_both, eps_both = both(torch.cat([z, z]), torch.cat([logsnr, logsnr]))  # (2B, C, H, W) each
    w = w.to(z.device)
    return (guided_combination(conditional=x_both[:b], unconditional=x_both[b:], w=w),
            guided_combination(conditional=eps_both[:b], unconditional=eps_both[b:], w=w))


def drop_labels(y: Tensor, *, p: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Label dropout: each label replaced by ``null_label`` with probability ``p`` (one uniform draw per label)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"label dropout p must lie in [0, 1); got {p}")
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p  # (B,)
    return torch.where(drop, torch.full_like(y, null_label), y)


def sample_guidance(batch: int, *, w_min: float, w_max: float, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """w ~ U[w_min, w_max] per example, shape (B,)."""
    if not 0.0 <= w_min <= w_max:
        raise ValueError(f"guidance weights need 0 <= w_min <= w_max; got {w_min}, {w_max}")
    u = torch.rand(batch, device=device, dtype=dtype, generator=generator)
    return w_min + (w_max - w_min) * u


def class_balanced_labels(*, start: int, count: int, num_classes: int) -> Tensor:
    """Labels of examples start .. start + count - 1 of a class-balanced set: example i asks for class i mod K."""
    if num_classes < 1 or start < 0 or count < 0:
        raise ValueError(f"need num_classes >= 1, start >= 0, count >= 0; got {num_classes}, {start}, {count}")
    return torch.arange(start, start + count, dtype=torch.int64) % num_classes


class GuidedDenoiser:
    """The guided model x_hat_w, eps_hat_w (module docstring) of a class-conditional denoiser with a null class.

    ``conditional`` is a :class:`Denoiser` over a class-conditional net (its own bound labels are
    ignored); ``y`` (B,) the requested classes, ``w`` (B,) or a float the guidance weights,
    ``null_label`` the null class K. Two network calls per evaluation, as one call on 2B examples.
    """

    def __init__(self, conditional: Denoiser, *, y: Tensor, w: Tensor | float, null_label: int):
        _check_labels(y, batch=y.shape[0])
        self.conditional = conditional
        self.y = y
        self.w = torch.as_tensor(w, dtype=torch.float64, device=y.device).expand(y.shape[0])  # (B,)
        self.null_label = null_label
        self._both = conditional.with_labels(torch.cat([y, torch.full_like(y, null_label)]))  # (2B,)

    def __call__(self, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        b = z.shape[0]
        if b != self.y.shape[0]:
            raise ValueError(f"z has {b} examples but {self.y.shape[0]} labels are bound")
        return guided_forward(self._both, z=z, logsnr=logsnr, w=self.w)


def guided(denoiser: Denoiser, *, arch: Architecture | UNetSpec, y: Tensor, w: float) -> DenoiserFn:
    """The denoiser that samples classes ``y`` (B,) at guidance weight ``w`` from ``denoiser`` over ``arch``'s net.

    A net with a guidance embedding takes (y, w) itself: one call. Otherwise w = 0 is the
    conditional model (one call) and w > 0 the :class:`GuidedDenoiser` (two calls), which needs the
    architecture's null class. ``arch``: the network's :class:`~pd_core.architecture.Architecture`
    (or the UNetSpec of the project's U-Net).
    """
    arch = as_architecture(arch)
    num_classes = arch.num_classes
    if num_classes < 1:
        raise ValueError("class labels and a guidance weight need a class-conditional model (model.class_conditional)")
    if not w >= 0:
        raise ValueError(f"guidance weight w must be >= 0; got {w}")
    _check_labels(y, batch=y.shape[0])
    if bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}]; got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    if arch.guidance_embedding:
        return denoiser.with_labels(y).with_guidance(torch.full(y.shape, float(w), device=y.device))
    if w == 0:
        return denoiser.with_labels(y)
    if not arch.null_class:
        raise ValueError(f"guidance weight w = {w} needs a model with a null class (model.class_conditional, "
                         f"trained with teacher.label_dropout > 0)")
    return GuidedDenoiser(denoiser, y=y, w=w, null_label=num_classes)


class GuidanceLoss:
    """Stage 1 (module docstring): per-example weight(lambda_t) ||x_hat_student(z_t, c, w) - x_hat_w(z_t, c)||^2.

    ``teacher`` is a Denoiser over the frozen class-conditional teacher net (with its null class
    ``null_label``); the student is a Denoiser over a net with a guidance embedding. No clipping.
    """

    def __init__(self, teacher: Denoiser, *, null_label: int, w_min: float, w_max: float, weighting: str,
                 schedule: Schedule = COSINE, t_min: float = 0.0):
        if not 0.0 <= w_min <= w_max:
            raise ValueError(f"guidance weights need 0 <= w_min <= w_max; got {w_min}, {w_max}")
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"t_min must lie in [0, 1); got {t_min}")
        self.t_min = t_min
        self.teacher = teacher
        self.null_label = null_label
        self.w_min, self.w_max = w_min, w_max
        self.weighting = weighting
        self.schedule = schedule

    def targets(self, x: Tensor, y: Tensor, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Draw t ~ U[t_min, 1), eps, w ~ U[w_min, w_max] (in that order); return (z_t, lambda_t, w, x_hat_w(z_t, y)).

        The target is computed without gradients.
        """
        check_image_batch("x", x)
        _check_labels(y, batch=x.shape[0])
        b = x.shape[0]
        t = torch.rand(b, device=x.device, dtype=x.dtype, generator=generator)  # (B,)
        if self.t_min:  # a discrete schedule: t ~ U[1/T, 1), from its first training timestep on
            t = self.t_min + (1.0 - self.t_min) * t
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        w = sample_guidance(b, w_min=self.w_min, w_max=self.w_max, generator=generator, device=x.device,
                            dtype=x.dtype)
        lam = self.schedule.logsnr_unchecked(t)  # t in [0, 1) by construction
        alpha, sigma = (broadcast_to(v, x) for v in alpha_sigma(lam))
        z = alpha * x + sigma * eps
        with torch.no_grad():
            x_w, _ = GuidedDenoiser(self.teacher, y=y, w=w, null_label=self.null_label)(z, lam)
        return z, lam, w, x_w

    def __call__(self, student: Denoiser, x: Tensor, y: Tensor, *,
                 generator: torch.Generator | None = None) -> Tensor:
        check_combination(parameterization=student.parameterization, weighting=self.weighting)
        z, lam, w, x_w = self.targets(x, y, generator=generator)
        x_hat, _ = student.with_labels(y).with_guidance(w)(z, lam)
        return per_example_loss(x_hat=x_hat.float(), x=x_w.float(), logsnr=lam.float(), kind=self.weighting)
