"""Progressive distillation target: times off the student's grid, bad step counts and shapes raise ValueError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pd_core import distill
from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss
from tests.distill_reference import C, H, NumpyTeacher, W


def _call(t, n, z=None):
    teacher = NumpyTeacher(0, consistent=True).torch()
    z = torch.zeros(len(t), C, H, W, dtype=torch.float64) if z is None else z
    return distill.distillation_target(teacher, z=z, t=torch.tensor(t, dtype=torch.float64), num_steps=n)


@pytest.mark.parametrize("t,n", [([0.3], 4), ([0.25, 0.6], 4), ([0.0], 4), ([1.25], 4), ([-0.25], 4),
                                 ([0.5], 1), ([1.0 + 1.0 / 4096], 4096), ([0.5 / 4096 + 0.5], 4096)])
def test_t_not_on_grid_or_out_of_range_raises(t, n):
    with pytest.raises(ValueError, match=r"\bt\b"):
        _call(t, n)


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True])
def test_bad_num_steps_raises(n):
    with pytest.raises(ValueError, match="num_steps"):
        _call([1.0], n)
    with pytest.raises(ValueError, match="num_steps"):
        DistillationLoss(Denoiser(nn.Identity(), parameterization="x"), num_steps=n, weighting="snr_trunc")


def test_t_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"\bt\b"):
        distill.distillation_target(NumpyTeacher(0, consistent=True).torch(),
                                    z=torch.zeros(2, C, H, W, dtype=torch.float64),
                                    t=torch.ones(2, 1, dtype=torch.float64), num_steps=2)
    with pytest.raises(ValueError, match=r"\bt\b"):
        distill.distillation_target(NumpyTeacher(0, consistent=True).torch(),
                                    z=torch.zeros(2, C, H, W, dtype=torch.float64),
                                    t=torch.ones(3, dtype=torch.float64), num_steps=2)
