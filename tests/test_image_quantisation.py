"""pd_core.images: uint8 quantisation (round half up, clipped; what a PNG holds) and the sample grid's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pd_core import images


def test_uint8_quantisation_is_round_half_up_and_clipped():
    k = torch.arange(256, dtype=torch.float64)
    halves = ((k + 0.5) / 127.5 - 1.0).float()  # exactly between two levels (up to float32)
    x = torch.cat([torch.linspace(-1.3, 1.3, 1001), halves, torch.tensor([-1.0, 1.0])])
    expected = np.clip(np.floor((x.numpy().astype(np.float32) + 1) * 127.5 + 0.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images.to_uint8(x).numpy(), expected)
    assert images.to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="non-finite"):
        images.to_uint8(torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_quantisation_equals_png_roundtrip(tmp_path, channels):
    x = torch.rand(1, channels, 9, 7, generator=torch.Generator().manual_seed(channels)) * 2.2 - 1.1
    url = images.write_grid(x, str(tmp_path / "one.png"), padding=0)
    png = np.asarray(Image.open(url))
    png = png[:, :, None] if png.ndim == 2 else png  # (H, W, C)
    np.testing.assert_array_equal(png, images.to_uint8(x)[0].permute(1, 2, 0).numpy())


def test_sample_grid_layout_through_fsspec():
    x = torch.rand(5, 3, 4, 6) * 2 - 1
    url = images.write_grid(x, "memory://pd-tests/grids/grid.png", padding=1)
    grid = images.read_png(url)  # (3, H, W)
    assert grid.shape == (3, 2 * (4 + 1) + 1, 3 * (6 + 1) + 1)  # ceil(sqrt(5)) = 3 columns, 2 rows
    u = images.to_uint8(x)
    assert torch.equal(grid[:, 1:5, 1:7], u[0]) and torch.equal(grid[:, 6:10, 8:14], u[4])
