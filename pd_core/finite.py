"""Checks a trained network passes before it is published as complete: finite weights, finite samples.

A finite training loss does not prove finite weights: the loss checked is the one before the last
optimizer step, and one huge step can take the weights to ~1e30 where the network's outputs overflow.
So a student is sampled (a few images, a fixed seed, DDIM at its own step count) and every value of
the weights and of the network's outputs along the way must be finite; otherwise the round fails
with :class:`NonFiniteOutputError` and nothing is saved as complete.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pd_core import samplers
from pd_core.guidance import guided
from pd_core.models import LoadedModel
from pd_core.train import NonFiniteLossError

CHECK_SAMPLES = 8  # images sampled by the check
CHECK_SEED = 0  # their noise seed


class NonFiniteOutputError(NonFiniteLossError):
    """A trained network's weights or samples hold NaN/inf; it is not saved as complete."""


def nonfinite_weights(weights: dict[str, Tensor]) -> int:
    """Number of NaN/inf values over all floating-point tensors of ``weights``."""
    return sum(int((~torch.isfinite(t)).sum()) for t in weights.values() if t.is_floating_point())


def nonfinite_samples(model: LoadedModel, *, steps: int, num: int = CHECK_SAMPLES, seed: int = CHECK_SEED,
                      device: torch.device | str = "cpu", w: float = 0.0) -> tuple[int, int]:
    """(non-finite values, values checked) over ``num`` DDIM samples in ``steps`` steps from noise seeded by ``seed``.

    Counted are the network's raw outputs x_hat and eps_hat at every step (before the sampler clips
    x_hat, which would turn inf into 1) and the final images. A class-conditional network samples
    classes 0, 1, ... in turn at guidance weight ``w`` (:func:`pd_core.guidance.guided`; a network
    that takes w gets it as its input).
    """
    z = torch.randn((num, *model.image_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    denoiser = model.denoiser
    if model.num_classes:
        labels = torch.arange(num, device=z.device) % model.num_classes
        denoiser = guided(denoiser, arch=model.architecture, y=labels, w=w)
    counts = [0, 0]

    def watched(z_t: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        x_hat, eps_hat = denoiser(z_t, logsnr)
        for t in (x_hat, eps_hat):
            counts[0] += int((~torch.isfinite(t)).sum())
            counts[1] += t.numel()
        return x_hat, eps_hat

    with torch.inference_mode():
        x = samplers.ddim(watched, z, num_steps=steps, schedule=model.schedule)
    counts[0] += int((~torch.isfinite(x)).sum())
    counts[1] += x.numel()
    return counts[0], counts[1]


__all__ = ["CHECK_SAMPLES", "CHECK_SEED", "NonFiniteOutputError", "nonfinite_samples", "nonfinite_weights"]
