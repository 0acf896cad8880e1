"""Parameterizations: a wrong output shape, log-SNR shape or kind raises ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

from pd_core import parameterization

B, C, H, W = 6, 3, 4, 4


def test_wrong_output_shape_raises_naming_output():
    z = torch.zeros(B, C, H, W)
    lam = torch.zeros(B)
    with pytest.raises(ValueError, match="output"):
        parameterization.to_x_eps(torch.zeros(B, C, H, W), z=z, logsnr=lam, kind="both")  # needs 2C
    with pytest.raises(ValueError, match="output"):
        parameterization.to_x_eps(torch.zeros(B, 2 * C, H, W), z=z, logsnr=lam, kind="x")
    with pytest.raises(ValueError, match="output"):
        parameterization.to_x_eps(torch.zeros(B, C, H, W + 1), z=z, logsnr=lam, kind="eps")
    with pytest.raises(ValueError, match="output"):
        parameterization.to_x_eps(torch.zeros(B + 1, C, H, W), z=z, logsnr=lam, kind="v")


@pytest.mark.parametrize("bad", [torch.zeros(B, 1), torch.zeros(B + 1), torch.zeros(()), torch.zeros(B, C, H, W)])
def test_wrong_logsnr_shape_raises_naming_logsnr(bad):
    with pytest.raises(ValueError, match="logsnr"):
        parameterization.to_x_eps(torch.zeros(B, C, H, W), z=torch.zeros(B, C, H, W), logsnr=bad, kind="x")


@pytest.mark.parametrize("bad", ["epsilon", "X", "", "x&eps"])
def test_unknown_kind_raises_naming_kind(bad):
    with pytest.raises(ValueError, match="kind"):
        parameterization.to_x_eps(torch.zeros(B, C, H, W), z=torch.zeros(B, C, H, W), logsnr=torch.zeros(B), kind=bad)
