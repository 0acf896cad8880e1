"""DDIM, ancestral and Heun refuse bad arguments with a ValueError naming them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import samplers
from tests.sampler_oracles import (
    _z,
    gaussian_oracle,
)


@pytest.mark.parametrize("sampler", [samplers.ddim, samplers.ancestral, samplers.heun])
def test_bad_arguments(sampler):
    den = gaussian_oracle(0.3)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_steps"):
            sampler(den, _z(), num_steps=bad)
    with pytest.raises(ValueError, match=r"\bz\b"):
        sampler(den, torch.zeros(4), num_steps=2)
    with pytest.raises(ValueError, match=r"\bz\b"):
        sampler(den, np.zeros((4, 1, 1, 1)), num_steps=2)
