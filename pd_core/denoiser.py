"""Network + parameterization -> a denoiser ``denoiser(z, logsnr) -> (x_hat, eps_hat)``."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from pd_core._checks import check_kind
from pd_core.parameterization import KINDS, to_x_eps


class DenoiserFn(Protocol):
    """What samplers and the distillation target call: (z (B,C,H,W), logsnr (B,)) -> (x_hat, eps_hat)."""

    def __call__(self, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]: ...


class Denoiser:
    """Wrap a network ``net(z, logsnr, y)`` and a parameterization into a :class:`DenoiserFn`.

    Never clips: samplers clip (and recompute eps) themselves; distillation must not clip.
    ``y`` binds class labels (B,) for a class-conditional network, ``w`` guidance weights (B,) for a
    network with a guidance embedding.
    """

    def __init__(self, net: nn.Module, *, parameterization: str, y: Tensor | None = None,
                 w: Tensor | None = None):
        check_kind("parameterization", parameterization, KINDS)
        self.net = net
        self.parameterization = parameterization
        self.y = y
        self.w = w

    def with_labels(self, y: Tensor | None) -> Denoiser:
        """The same denoiser with class labels bound (and the same guidance weights)."""
        return Denoiser(self.net, parameterization=self.parameterization, y=y, w=self.w)

    def with_guidance(self, w: Tensor | None) -> Denoiser:
        """The same denoiser with guidance weights bound (and the same labels)."""
        return Denoiser(self.net, parameterization=self.parameterization, y=self.y, w=w)

    def output(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """The raw network output."""
        if self.w is not None:
            return self.net(z, logsnr, self.y, self.w)
        return self.net(z, logsnr, self.y) if self.y is not None else self.net(z, logsnr)

    def __call__(self, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        out = self.output(z, logsnr)
        return to_x_eps(out.to(z.dtype), z=z, logsnr=logsnr.to(z.dtype), kind=self.parameterization)
