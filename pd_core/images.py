"""Images as a saved file would hold them: uint8 quantisation and sample-grid PNGs through fsspec.

Every metric sees images exactly as a PNG would store them (docs/design.md), so generated samples
go through :func:`to_uint8` before any feature network, and the grids written for people are the
same bytes.
"""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """Quantise images in [-1, 1] to uint8 as a saved PNG holds them.

    u = clip(round((x + 1) * 127.5), 0, 255), rounding halves up (floor(v + 0.5)), which is what
    ``np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)`` in the official code writes.
    Non-finite values raise: a diverged sampler must be reported, not silently turned into grey.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"images must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1] or uint8; got dtype {x.dtype}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"images contain {bad} non-finite values (NaN/inf); cannot quantise to uint8")
    # float32 is exact enough: (x + 1) * 127.5 has ~1e-5 absolute error, far below a rounding step,
    # and float64 would double the cost on GPU for nothing.
    v = torch.floor((x.float() + 1.0) * 127.5 + 0.5)
    return v.clamp_(0.0, 255.0).to(torch.uint8)


def from_uint8(u: Tensor) -> Tensor:
    """Map uint8 images back to float32 in [-1, 1]: x = u / 127.5 - 1."""
    if u.dtype != torch.uint8:
        raise ValueError(f"images must be uint8; got dtype {u.dtype}")
    return u.float() / 127.5 - 1.0


def make_grid(images: Tensor, *, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile N images (N, C, H, W) into one uint8 array (rows*H', cols*W', C), C in {1, 3}.

    Float images are quantised with :func:`to_uint8` first. ``nrow`` is the number of images per
    row (default ceil(sqrt(N)), a square-ish grid).
    """
    u = to_uint8(images).cpu()
    if u.ndim != 4 or u.shape[1] not in (1, 3) or u.shape[0] < 1:
        raise ValueError(f"images must have shape (N, C, H, W) with N >= 1 and C in (1, 3); got {tuple(u.shape)}")
    n, c, h, w = u.shape
    cols = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"nrow must be >= 1; got {nrow}")
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    hwc = u.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top:top + h, left:left + w] = hwc[i]
    return grid


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array (H, W, 1|3) as PNG bytes (lossless, so the file holds exactly ``array``)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"array must be uint8 (H, W, 1|3); got {array.dtype} {array.shape}")
    # Pillow infers "L" for (H, W) uint8 and "RGB" for (H, W, 3) uint8.
    img = Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_grid(images: Tensor, url: str, *, nrow: int | None = None, padding: int = 2,
               storage_options: dict | None = None) -> str:
    """Write a PNG sample grid of ``images`` (N, C, H, W) to ``url`` (a path or any fsspec URL); return ``url``."""
    data = png_bytes(make_grid(images, nrow=nrow, padding=padding))
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(data)
    return url


def read_png(url: str, *, storage_options: dict | None = None) -> Tensor:
    """Read a PNG (path or fsspec URL) as a uint8 tensor (C, H, W), C in {1, 3}."""
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        img = Image.open(io.BytesIO(f.read()))
        img.load()
    arr = np.asarray(img.convert("L") if img.mode in ("L", "I", "I;16", "1") else img.convert("RGB"))
    arr = arr[:, :, None] if arr.ndim == 2 else arr  # (H, W, C)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)
