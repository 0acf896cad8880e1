"""Network output -> (x_hat, eps_hat) for the four parameterizations of the paper.

- ``eps``:  x_hat = (z - sigma eps_out) / alpha
- ``x``:    x_hat = x_out
- ``v``:    x_hat = alpha z - sigma v_out, with v = alpha eps - sigma x
- ``both``: x_hat = sigma^2 x_out + alpha (z - sigma eps_out)   (first C channels x_out, last C eps_out)

Then eps_hat = (z - alpha x_hat) / sigma (``eps`` without clipping keeps eps_out).
With clipping, x_hat is clipped to [-1, 1] FIRST and eps_hat recomputed from the clipped x_hat.
"""

from __future__ import annotations

from torch import Tensor

from pd_core._checks import broadcast_to, check_batch_vector, check_image_batch, check_kind
from pd_core.kinds import PARAMETERIZATIONS
from pd_core.schedule import alpha_sigma

KINDS = PARAMETERIZATIONS


def output_channels(*, kind: str, channels: int) -> int:
    """Number of network output channels for a parameterization (``both`` needs 2C)."""
    check_kind("kind", kind, KINDS)
    return 2 * channels if kind == "both" else channels


def eps_from_x(*, x: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (z - alpha x) / sigma."""
    return (z - alpha * x) / sigma


def x_from_eps(*, eps: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x = (z - sigma eps) / alpha."""
    return (z - sigma * eps) / alpha


def v_target(*, x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x."""
    return alpha * eps - sigma * x


def clip_x_eps(x_hat: Tensor, *, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Clip x_hat to [-1, 1], then eps_hat = (z - alpha x_hat) / sigma from the clipped x_hat."""
    alpha, sigma = (broadcast_to(s, z) for s in alpha_sigma(logsnr))
    x_hat = x_hat.clamp(-1.0, 1.0)
    return x_hat, eps_from_x(x=x_hat, z=z, alpha=alpha, sigma=sigma)


def to_x_eps(output: Tensor, *, z: Tensor, logsnr: Tensor, kind: str, clip: bool = False) -> tuple[Tensor, Tensor]:
    """Convert a network output to (x_hat, eps_hat); see the module docstring for the equations.

    ``logsnr`` has shape (B,); ``output`` has z's shape, or 2C channels for ``both``.
    """
    check_kind("kind", kind, KINDS)
    check_image_batch("z", z)
    check_batch_vector("logsnr", logsnr, batch=z.shape[0])
    expected = (z.shape[0], output_channels(kind=kind, channels=z.shape[1]), *z.shape[2:])
    if tuple(output.shape) != expected:
        raise ValueError(f"output must have shape {expected} for kind={kind!r} with z of shape {tuple(z.shape)}; "
                         f"got {tuple(output.shape)}")
    alpha, sigma = (broadcast_to(s, z) for s in alpha_sigma(logsnr))  # (B, 1, 1, 1)
    eps_hat = None
    if kind == "eps":
        eps_hat = output
        x_hat = x_from_eps(eps=output, z=z, alpha=alpha, sigma=sigma)
    elif kind == "x":
        x_hat = output
    elif kind == "v":
        x_hat = alpha * z - sigma * output
    else:  # both
        x_out, eps_out = output.chunk(2, dim=1)  # (B, C, H, W) each
        x_hat = sigma**2 * x_out + alpha * (z - sigma * eps_out)
    if clip:
        return clip_x_eps(x_hat, z=z, logsnr=logsnr)
    if eps_hat is None:
        eps_hat = eps_from_x(x=x_hat, z=z, alpha=alpha, sigma=sigma)
    return x_hat, eps_hat
