"""pd_core.images: the grids people look at (nearest-neighbour upscale, minimum width, caption).

The metrics' images are the quantised samples (tests/test_image_quantisation.py); the display grid must hold
exactly those pixels, each repeated in a k x k block (checked against numpy's Kronecker product,
an independent computation), with nothing but padding between them and a caption bar above.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pd_core import images


def _samples(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2.2 - 1.1


@pytest.mark.parametrize("channels", [1, 3])
def test_display_grid_is_an_exact_nearest_neighbour_upscale_of_the_quantised_samples(channels):
    x = _samples(5, channels, 4, 6, seed=channels)
    k, pad = 3, 2
    grid = images.display_grid(x, scale=k, padding=pad)  # no caption: the grid alone
    u = images.to_uint8(x).numpy()  # (N, C, H, W), what the metrics see
    cols, rows = 3, 2  # ceil(sqrt(5)) columns
    bh, bw = 4 * k, 6 * k
    assert grid.shape == (rows * (bh + pad) + pad, cols * (bw + pad) + pad, channels)
    covered = np.zeros(grid.shape[:2], dtype=bool)
    for i in range(5):
        r, c = divmod(i, cols)
        top, left = pad + r * (bh + pad), pad + c * (bw + pad)
        expected = np.stack([np.kron(u[i, ch], np.ones((k, k), dtype=np.uint8)) for ch in range(channels)], axis=-1)
        np.testing.assert_array_equal(grid[top:top + bh, left:left + bw], expected)
        covered[top:top + bh, left:left + bw] = True
    assert (grid[~covered] == 0).all(), "only padding (0) between and around the samples"


def test_scale_one_display_grid_equals_the_plain_grid():
    x = _samples(7, 1, 8, 8)
    np.testing.assert_array_equal(images.display_grid(x, scale=1), images.make_grid(x))


@pytest.mark.parametrize(("n", "side"), [(16, 8), (64, 8), (64, 28), (64, 32), (4, 300), (1, 8), (3, 5)])
def test_automatic_scale_is_the_smallest_that_reaches_the_minimum_width(n, side):
    x = _samples(n, 1, side, side)
    grid = images.display_grid(x)
    cols, pad = math.ceil(math.sqrt(n)), 2
    k = (grid.shape[1] - pad) // cols - pad
    assert k % side == 0
    k //= side
    assert grid.shape[1] >= images.DISPLAY_MIN_WIDTH or k == images.MAX_DISPLAY_SCALE
    if k > 1:  # one factor less would be too narrow
        assert cols * ((k - 1) * side + pad) + pad < images.DISPLAY_MIN_WIDTH
    assert images.display_scale(image_width=side, columns=cols) == k or k == images.MAX_DISPLAY_SCALE


def test_the_smoke_grid_becomes_readable():
    # The smoke preset's grid: 4 x 4 digits of 8 x 8 px, 42 px wide at native size.
    x = _samples(16, 1, 8, 8)
    assert images.make_grid(x).shape[1] == 42
    grid = images.display_grid(x, caption="smoke | round 3 (2->1) | 1 step | DDIM", nrow=4)
    assert grid.shape[1] == 4 * (8 * 16 + 2) + 2 == 522  # 16x: each digit is 128 px wide


def test_caption_bar_sits_above_the_unchanged_grid_and_holds_text():
    x = _samples(16, 3, 8, 8)
    plain = images.display_grid(x)
    captioned = images.display_grid(x, caption="smoke | teacher | 8 steps | DDIM")
    bar = captioned.shape[0] - plain.shape[0]
    assert 12 <= bar <= 60 and captioned.shape[1:] == plain.shape[1:]
    np.testing.assert_array_equal(captioned[bar:], plain)
    ink = captioned[:bar]
    assert (ink > 128).mean() > 0.01, "the caption bar holds visible (white) text"
    other = images.display_grid(x, caption="smoke | round 1 (8->4) | 4 steps | DDIM")
    assert not np.array_equal(other[:bar], ink), "another caption draws other text"


def test_a_caption_too_long_for_the_grid_is_shortened_not_overflowing():
    grid = np.zeros((20, 60, 1), dtype=np.uint8)
    out = images.add_caption(grid, "a very long caption " * 20)
    assert out.shape[1] == 60 and out.shape[0] > 20
    assert (out[:-20, -2:] == 0).all(), "no text runs into the right margin"


def test_display_grid_refuses_bad_scales_and_oversized_grids():
    x = _samples(4, 1, 8, 8)
    for bad in (0, -1, images.MAX_DISPLAY_SCALE + 1):
        with pytest.raises(ValueError, match="scale must be an integer from 1 to"):
            images.display_grid(x, scale=bad)
    with pytest.raises(ValueError, match="exceeds"):
        images.display_grid(_samples(1024, 1, 32, 32), scale=32)
    with pytest.raises(ValueError, match="uint8"):
        images.upscale_nearest(x, scale=2)


def test_display_grid_png_round_trips_through_fsspec():
    x = _samples(9, 1, 8, 8)
    url = images.write_display_grid(x, "memory://pd-tests/display/grid.png", caption="a | b", nrow=3)
    back = images.read_png(url).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(back, images.display_grid(x, caption="a | b", nrow=3))
