"""Samplers over any denoiser ``denoiser(z, logsnr) -> (x_hat, eps_hat)``.

All walk the student grid t = (i + 1)/N -> i/N for i = N-1 .. 0, start from z ~ N(0, I) at t = 1,
and return x_hat at the last step (i = 0), as the official sampler does. Pure functions: no I/O,
randomness only through an injected ``generator``, progress through ``callback(step, num_steps)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pd_core._checks import broadcast_to, check_image_batch, check_num_steps
from pd_core.denoiser import DenoiserFn
from pd_core.parameterization import clip_x_eps
from pd_core.schedule import COSINE, DiscreteSchedule, Schedule, alpha_sigma, ddim_destination

Callback = Callable[[int, int], None]


def _logsnr_table(*, num_steps: int, batch: int, like: Tensor, schedule: Schedule) -> Tensor:
    """lambda(i / N) for i = 0..N, each repeated over the batch: shape (N + 1, B), on ``like``'s device.

    Computed once per sampler call (float64 on the host, one copy to the device), so a step costs
    the network and a few elementwise ops, nothing else: step i walks row i + 1 -> row i.
    """
    grid = schedule.logsnr(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)  # (N + 1,)
    table = grid.to(like.dtype)[:, None].expand(num_steps + 1, batch).contiguous()  # (N + 1, B)
    return table.to(like.device, non_blocking=True)


def _destination_table(*, num_steps: int, batch: int, like: Tensor, schedule: Schedule) -> tuple[Tensor, list[bool]]:
    """Where DDIM step i (from t = (i + 1) / N) lands, :func:`schedule.ddim_destination`: shape (N, B), and
    per step whether that is the clean end (the step returns x_hat)."""
    t = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    dest = ddim_destination(schedule, t, num_steps=num_steps)  # (N,) float64, on the host
    clean = [bool(v) for v in torch.isinf(dest)]
    table = dest.to(like.dtype)[:, None].expand(num_steps, batch).contiguous()
    return table.to(like.device, non_blocking=True), clean


def _denoise(denoiser: DenoiserFn, z: Tensor, lam: Tensor, *, clip: bool,
            keep_eps: bool = False) -> tuple[Tensor, Tensor]:
    x_hat, eps_hat = denoiser(z, lam)
    if clip and keep_eps:
        return x_hat.clamp(-1.0, 1.0), eps_hat
    return clip_x_eps(x_hat, z=z, logsnr=lam) if clip else (x_hat, eps_hat)


def _validate(z: Tensor, num_steps: int) -> None:
    check_image_batch("z", z)
    check_num_steps("num_steps", num_steps)


@torch.no_grad()
def ddim(denoiser: DenoiserFn, z: Tensor, *, num_steps: int, clip: bool = True, callback: Callback | None = None,
         schedule: Schedule = COSINE, keep_eps: bool | None = None) -> Tensor:
    """DDIM: z_s = alpha_s x_hat + sigma_s eps_hat (N network calls).

    Step i evaluates the network at t = (i + 1) / N and lands at :func:`schedule.ddim_destination`
    (t - 1 / N; on a discrete schedule diffusers' ``DDIMScheduler`` rule, so DDIM over an imported
    model is diffusers' trailing DDIM at every N); a step landing on the clean end returns x_hat.
    With ``clip``, x_hat is clipped to [-1, 1] and eps_hat re-derived from it, or, with ``keep_eps``,
    the model's eps_hat kept: diffusers' ``DDIMScheduler`` with ``clip_sample=True`` and its default
    ``use_clipped_model_output=False``. ``keep_eps=None`` keeps eps on a discrete schedule (so DDIM over
    an imported model or its student is the stock ``DDIMPipeline`` call) and re-derives it otherwise.
    """
    keep_eps = isinstance(schedule, DiscreteSchedule) if keep_eps is None else keep_eps
    _validate(z, num_steps)
    lams = _logsnr_table(num_steps=num_steps, batch=z.shape[0], like=z, schedule=schedule)
    dest, clean = _destination_table(num_steps=num_steps, batch=z.shape[0], like=z, schedule=schedule)
    for i in reversed(range(num_steps)):
        x_hat, eps_hat = _denoise(denoiser, z, lams[i + 1], clip=clip, keep_eps=keep_eps)
        if clean[i]:
            z = x_hat
        else:
            alpha_s, sigma_s = (broadcast_to(v, z) for v in alpha_sigma(dest[i]))
            z = alpha_s * x_hat + sigma_s * eps_hat
        if callback is not None:
            callback(num_steps - i, num_steps)
    return z


def ancestral_moments(*, z_t: Tensor, x_hat: Tensor, logsnr_t: Tensor, logsnr_s: Tensor,
                      gamma: float) -> tuple[Tensor, Tensor]:
    """Mean and log-variance of q(z_s | z_t, x = x_hat), variance log-interpolated by ``gamma``.

    r = e^{lambda_t - lambda_s};  mean = r (alpha_s / alpha_t) z_t + (1 - r) alpha_s x_hat;
    log var = log(1 - r) + gamma log sigma_t^2 + (1 - gamma) log sigma_s^2
    (gamma = 0: the posterior variance (1 - r) sigma_s^2; gamma = 1: (1 - r) sigma_t^2).
    """
    alpha_t, _ = alpha_sigma(logsnr_t)
    alpha_s, _ = alpha_sigma(logsnr_s)
    r = torch.exp(logsnr_t - logsnr_s)
    log_one_minus_r = torch.log(-torch.expm1(logsnr_t - logsnr_s))
    logvar = log_one_minus_r + gamma * torch.nn.functional.logsigmoid(-logsnr_t) \
        + (1.0 - gamma) * torch.nn.functional.logsigmoid(-logsnr_s)
    b = lambda v: broadcast_to(v, z_t)  # noqa: E731  (B,) -> (B, 1, 1, 1)
    mean = b(r * alpha_s / alpha_t) * z_t + b((1.0 - r) * alpha_s) * x_hat
    return mean, b(logvar)


@torch.no_grad()
def ancestral(denoiser: DenoiserFn, z: Tensor, *, num_steps: int, gamma: float = 0.3, clip: bool = True,
              generator: torch.Generator | None = None, callback: Callback | None = None,
              schedule: Schedule = COSINE) -> Tensor:
    """Stochastic (ancestral) sampler: z_s ~ N(mean, exp(logvar)) from :func:`ancestral_moments`.

    ``gamma`` in [0, 1] is the variance-interpolation coefficient the paper tunes per step count.
    """
    _validate(z, num_steps)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1]; got {gamma}")
    lams = _logsnr_table(num_steps=num_steps, batch=z.shape[0], like=z, schedule=schedule)
    for i in reversed(range(num_steps)):
        lam_t, lam_s = lams[i + 1], lams[i]
        x_hat, _ = _denoise(denoiser, z, lam_t, clip=clip)
        if i == 0:
            z = x_hat
        else:
            mean, logvar = ancestral_moments(z_t=z, x_hat=x_hat, logsnr_t=lam_t, logsnr_s=lam_s, gamma=gamma)
            noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
            z = mean + torch.exp(0.5 * logvar) * noise
        if callback is not None:
            callback(num_steps - i, num_steps)
    return z


def forward_step(*, z_u: Tensor, logsnr_u: Tensor, logsnr_s: Tensor, noise: Tensor) -> Tensor:
    """A draw of the forward process q(z_s | z_u) from a less noisy u to a noisier s (lambda_s < lambda_u):

    z_s = (alpha_s / alpha_u) z_u + sqrt(sigma_s^2 - (alpha_s / alpha_u)^2 sigma_u^2) noise,
    the variance computed as sigma_s^2 (1 - e^{lambda_s - lambda_u}) (the same number, without cancellation).
    """
    alpha_u, _ = alpha_sigma(logsnr_u)
    alpha_s, _ = alpha_sigma(logsnr_s)
    var = torch.sigmoid(-logsnr_s) * -torch.expm1(logsnr_s - logsnr_u)  # (B,)
    return broadcast_to(alpha_s / alpha_u, z_u) * z_u + broadcast_to(var.sqrt(), z_u) * noise


@torch.no_grad()
def stochastic_two_step(denoiser: DenoiserFn, z: Tensor, *, num_steps: int, clip: bool = True,
                        generator: torch.Generator | None = None, callback: Callback | None = None,
                        schedule: Schedule = COSINE) -> Tensor:
    """The N-step stochastic sampler of Meng et al. (2023) for distilled models.

    From t = (i + 1) / N, i = N - 1 .. 1: one deterministic DDIM step of twice the length,
    t -> u = t - 2/N (z_u = alpha_u x_hat + sigma_u eps_hat), then one stochastic step back to
    s = t - 1/N by the forward process (:func:`forward_step`). The last step (from t = 1/N) is
    deterministic and returns x_hat. N network calls.
    """
    _validate(z, num_steps)
    lams = _logsnr_table(num_steps=num_steps, batch=z.shape[0], like=z, schedule=schedule)
    for i in reversed(range(num_steps)):
        x_hat, eps_hat = _denoise(denoiser, z, lams[i + 1], clip=clip)
        if i == 0:
            z = x_hat
        else:
            lam_u, lam_s = lams[i - 1], lams[i]
            alpha_u, sigma_u = (broadcast_to(v, z) for v in alpha_sigma(lam_u))
            z_u = alpha_u * x_hat + sigma_u * eps_hat
            noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
            z = forward_step(z_u=z_u, logsnr_u=lam_u, logsnr_s=lam_s, noise=noise)
        if callback is not None:
            callback(num_steps - i, num_steps)
    return z


@torch.no_grad()
def heun(denoiser: DenoiserFn, z: Tensor, *, num_steps: int, clip: bool = True, callback: Callback | None = None,
         schedule: Schedule = COSINE) -> Tensor:
    """Probability-flow ODE baseline: Heun's method in data-prediction form, dy/d rho = x_hat.

    y = z / sigma, rho = alpha / sigma = exp(lambda / 2). Euler on this ODE is exactly DDIM
    (z_s = (sigma_s/sigma_t) z_t + (alpha_s - sigma_s alpha_t / sigma_t) x_hat); Heun averages x_hat at
    both ends, costing 2 network calls per step (2N - 1 in all: the last step returns x_hat, like the
    other samplers). (The eps form dy/d eta = eps_hat, y = z/alpha, eta = sigma/alpha, is badly conditioned
    on this schedule: its first step spans eta = e^10 -> O(1) and the corrector there is off by orders of
    magnitude at small N; x_hat is bounded, so the data-prediction form is not.)
    """
    _validate(z, num_steps)
    lams = _logsnr_table(num_steps=num_steps, batch=z.shape[0], like=z, schedule=schedule)
    for i in reversed(range(num_steps)):
        lam_t, lam_s = lams[i + 1], lams[i]
        x_t, _ = _denoise(denoiser, z, lam_t, clip=clip)
        if i == 0:
            z = x_t
        else:
            alpha_t, sigma_t = (broadcast_to(v, z) for v in alpha_sigma(lam_t))
            alpha_s, sigma_s = (broadcast_to(v, z) for v in alpha_sigma(lam_s))
            ratio = sigma_s / sigma_t
            coef = alpha_s - ratio * alpha_t  # = sigma_s (rho_s - rho_t)
            z_euler = ratio * z + coef * x_t  # the DDIM step
            x_s, _ = _denoise(denoiser, z_euler, lam_s, clip=clip)
            z = ratio * z + coef * 0.5 * (x_t + x_s)
        if callback is not None:
            callback(num_steps - i, num_steps)
    return z


def compiled(denoiser: DenoiserFn, *, mode: str | None = "reduce-overhead", dynamic: bool = False) -> DenoiserFn:
    """``denoiser`` under ``torch.compile`` for repeated calls at one batch shape (few-step sampling).

    On CUDA, ``mode="reduce-overhead"`` replays the whole denoiser (network and parameterization)
    as a CUDA graph: one launch per step instead of hundreds of kernel launches, which is what
    bounds 1- to 4-step sampling of small batches. The first call per shape compiles (tens of
    seconds); use it for many batches of the same shape. A CUDA graph's outputs are overwritten by
    its next replay, and Heun keeps x_hat across two calls, so the outputs are cloned (cheap next
    to the network). Samplers take the result like any denoiser, e.g.
    ``ddim(compiled(model.denoiser), z, num_steps=1)``.
    """
    fn = torch.compile(lambda z, lam: denoiser(z, lam), mode=mode, dynamic=dynamic)

    def call(z: Tensor, logsnr_: Tensor) -> tuple[Tensor, Tensor]:
        x_hat, eps_hat = fn(z, logsnr_)
        return x_hat.clone(), eps_hat.clone()

    return call
