"""Images as a saved file would hold them: uint8 quantisation and sample-grid PNGs through fsspec.

Every metric sees images exactly as a PNG would store them (docs/design.md), so generated samples
go through :func:`to_uint8` before any feature network. Two kinds of grid are written:

- :func:`make_grid` / :func:`write_grid`: the samples' own pixels, tiled (what figures and tests read);
- :func:`display_grid` / :func:`write_display_grid`: the grid for people, every sample enlarged by
  nearest-neighbour upscaling (each pixel becomes a k x k block, no interpolation) so the whole
  grid is at least ``DISPLAY_MIN_WIDTH`` pixels wide, under a caption bar drawn with Pillow.

Upscaling happens after quantisation and only for the PNGs people look at: metrics never see it.
"""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

DISPLAY_MIN_WIDTH = 512  # px: the narrowest display grid (a 4x4 grid of 8x8 digits would be 42 px)
MAX_DISPLAY_SCALE = 32  # largest upscale factor accepted
MAX_DISPLAY_SIDE = 8192  # px: the largest display grid side written


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


def display_scale(*, image_width: int, columns: int, padding: int = 2, min_width: int = DISPLAY_MIN_WIDTH) -> int:
    """Smallest integer k >= 1 with columns * (k * image_width + padding) + padding >= min_width."""
    if image_width < 1 or columns < 1 or padding < 0:
        raise ValueError(f"image_width and columns must be >= 1 and padding >= 0; got {image_width}, {columns}, "
                         f"{padding}")
    per_image = (min_width - padding) / columns - padding  # the upscaled width each image needs
    return max(1, math.ceil(per_image / image_width))


def upscale_nearest(u: Tensor, *, scale: int) -> Tensor:
    """Nearest-neighbour upscale of uint8 images (N, C, H, W): out[..., y, x] = u[..., y // k, x // k]."""
    if u.dtype != torch.uint8:
        raise ValueError(f"images must be uint8; got dtype {u.dtype}")
    if not 1 <= scale <= MAX_DISPLAY_SCALE:
        raise ValueError(f"scale must be an integer from 1 to {MAX_DISPLAY_SCALE}; got {scale}")
    return u.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _caption_font(text: str, *, width: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, str]:
    """Pillow's default font at the largest size from 24 px down to 9 px at which ``text`` fits ``width``;
    the text shortened with '...' when it fits at no size."""
    for size in range(min(24, max(9, width // 28)), 8, -1):
        font = ImageFont.load_default(size=size)
        if font.getlength(text) <= width:
            return font, text
    font = ImageFont.load_default(size=9)
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return font, text + "..."


def grid_caption(*, pipeline: str, manifest: dict, sampler: str, steps: int, w: float | None = None) -> str:
    """``smoke | round 3 (2->1) | 1 step | DDIM``: whose samples a grid shows (pipeline, round, steps, sampler),
    and ``| w 2`` when a class-conditional model sampled them at guidance weight ``w``.

    ``manifest`` is the checkpoint's manifest (its ``kind``, and a student's ``round``, ``teacher_steps``, ``steps``).
    """
    if manifest.get("kind") == "student" and manifest.get("round") is not None:
        halving = f" ({manifest['teacher_steps']}->{manifest['steps']})" if "teacher_steps" in manifest else ""
        what = f"round {manifest['round']}{halving}"
    elif manifest.get("kind") == "guided_student":
        what = "guide-distill"
    else:
        what = str(manifest.get("kind") or "model")
    label = "DDIM" if sampler == "ddim" else sampler
    guidance = "" if w is None else f" | w {w:g}"
    return f"{pipeline} | {what} | {steps} step{'' if steps == 1 else 's'} | {label}{guidance}"


def add_caption(grid: np.ndarray, caption: str) -> np.ndarray:
    """``grid`` (H, W, 1|3) uint8 under a black bar holding ``caption`` in white, one line, left-aligned."""
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] not in (1, 3):
        raise ValueError(f"grid must be uint8 (H, W, 1|3); got {grid.dtype} {grid.shape}")
    height, width, channels = grid.shape
    margin = max(4, width // 100)
    font, text = _caption_font(" ".join(caption.split()), width=width - 2 * margin)
    top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
    bar_height = bottom - top + 2 * margin
    mode = "L" if channels == 1 else "RGB"
    bar = Image.new(mode, (width, bar_height), 0)
    ImageDraw.Draw(bar).text((margin, margin - top), text, font=font, fill=255 if mode == "L" else (255, 255, 255))
    bar_array = np.asarray(bar).reshape(bar_height, width, channels)
    return np.concatenate([bar_array, grid], axis=0)


def display_grid_size(*, num: int, height: int, width: int, nrow: int | None = None, scale: int | None = None,
                      min_width: int = DISPLAY_MIN_WIDTH, padding: int = 2) -> tuple[int, int, int]:
    """(height px, width px, scale) of :func:`display_grid`'s tiles for ``num`` images of ``height`` x ``width``
    (without the caption bar), from the arguments alone: rows * (k h + p) + p by cols * (k w + p) + p,
    cols = nrow or ceil(sqrt(num)), rows = ceil(num / cols), k = ``scale`` or :func:`display_scale`."""
    columns = nrow if nrow is not None else math.ceil(math.sqrt(max(num, 1)))
    if scale is None:
        scale = min(MAX_DISPLAY_SCALE, display_scale(image_width=width, columns=max(columns, 1), padding=padding,
                                                     min_width=min_width))
    rows = math.ceil(max(num, 1) / max(columns, 1))
    return rows * (scale * height + padding) + padding, columns * (scale * width + padding) + padding, scale


def check_display_grid_size(*, num: int, height: int, width: int, nrow: int | None = None,
                            scale: int | None = None) -> None:
    """ValueError (one line) when :func:`display_grid` of these images would exceed ``MAX_DISPLAY_SIDE`` px."""
    grid_h, grid_w, _ = display_grid_size(num=num, height=height, width=width, nrow=nrow, scale=scale)
    if max(grid_h, grid_w) > MAX_DISPLAY_SIDE:
        raise ValueError(f"a display grid of {grid_w}x{grid_h} px exceeds {MAX_DISPLAY_SIDE} px; "
                         f"use a smaller scale or fewer images")


def display_grid(images: Tensor, *, caption: str | None = None, nrow: int | None = None, scale: int | None = None,
                 min_width: int = DISPLAY_MIN_WIDTH, padding: int = 2) -> np.ndarray:
    """The grid for people: :func:`make_grid` of the images upscaled by ``scale`` (default: the smallest
    factor that makes the grid at least ``min_width`` wide), under ``caption`` when given.

    Sample i's block in the result equals ``upscale_nearest(to_uint8(images))[i]`` exactly.
    """
    u = to_uint8(images).cpu()
    if u.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W); got {tuple(u.shape)}")
    grid_h, grid_w, scale = display_grid_size(num=u.shape[0], height=u.shape[-2], width=u.shape[-1], nrow=nrow,
                                              scale=scale, min_width=min_width, padding=padding)
    if max(grid_h, grid_w) > MAX_DISPLAY_SIDE:  # checked before the upscaled copy is made
        raise ValueError(f"a display grid of {grid_w}x{grid_h} px exceeds {MAX_DISPLAY_SIDE} px; "
                         f"use a smaller scale or fewer images")
    grid = make_grid(upscale_nearest(u, scale=scale), nrow=nrow, padding=padding)
    return add_caption(grid, caption) if caption else grid


def write_display_grid(images: Tensor, url: str, *, caption: str | None = None, nrow: int | None = None,
                       scale: int | None = None, storage_options: dict | None = None) -> str:
    """Write :func:`display_grid` of ``images`` as a PNG to ``url`` (a path or any fsspec URL); return ``url``."""
    data = png_bytes(display_grid(images, caption=caption, nrow=nrow, scale=scale))
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(data)
    return url
