"""Shaping images: uint8 -> float32 in [-1, 1], then pad or integer-downsample to image_size.

u -> u / 127.5 - 1 (0 -> -1, 255 -> 1). Smaller images are centre-padded with -1 (black); square
images whose side is a multiple of the target are average-pooled; anything else is refused.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pd_core.data.common import DatasetError


def to_unit_range(images: np.ndarray) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]: u / 127.5 - 1 (0 -> -1, 255 -> 1)."""
    return torch.tensor(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)  # copies: source may be read-only


def check_fits(height: int, width: int, *, size: int, source: str) -> None:
    """DatasetError unless :func:`fit_to_size` makes a height x width image size x size (pad or integer pool)."""
    if (height <= size and width <= size) or (height == width and height % size == 0):
        return
    raise DatasetError(f"{source}: images are {height}x{width} and cannot be made {size}x{size} (only padding smaller "
                       f"images and integer downsampling of square ones are done); set data.image_size to "
                       f"{max(height, width)} or resize the images")


def fit_to_size(images: Tensor, *, size: int, source: str) -> Tensor:
    """Pad (centred, value -1 = black) or integer-factor average-pool (N, C, H, W) images to size x size.

    Anything else (e.g. 40x40 into 32, non-square after downsampling) raises DatasetError.
    """
    _, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        # pad order for F.pad: (left, right, top, bottom)
        return F.pad(images, (left, size - w - left, top, size - h - top), value=-1.0)  # (N, C, size, size)
    check_fits(h, w, size=size, source=source)
    return F.avg_pool2d(images, kernel_size=h // size)  # (N, C, size, size): h == w, a multiple of size

