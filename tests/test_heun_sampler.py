"""Heun on the probability-flow ODE with oracle denoisers whose outputs are known in closed form (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import samplers
from tests.sampler_oracles import (
    Recorder,
    _z,
    gaussian_oracle,
    np_gaussian_ddim_gain,
    np_gaussian_ode_gain,
    point_oracle,
)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_heun_calls_2n_minus_1_and_point_oracle(n):
    x0 = torch.tensor(np.random.default_rng(3).uniform(-1, 1, size=(1, 2, 3, 3)))
    rec = Recorder(point_oracle(x0))
    out = samplers.heun(rec, _z(), num_steps=n)
    assert len(rec.calls) == 2 * n - 1
    np.testing.assert_allclose(out.numpy(), x0.expand(4, -1, -1, -1).numpy(), atol=1e-12)


def test_heun_deterministic():
    z = _z(seed=8)
    a = samplers.heun(gaussian_oracle(0.3), z, num_steps=6)
    b = samplers.heun(gaussian_oracle(0.3), z.clone(), num_steps=6)
    assert torch.equal(a, b)


def test_heun_is_second_order_on_gaussian_ode():
    """Against the exact ODE solution for Gaussian data, Heun beats DDIM (Euler) by a clear factor at every
    N, and its error shrinks faster than DDIM's when N doubles (second vs first order)."""
    s2 = 0.25
    z = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    errs_h, errs_d = [], []
    for n in (2, 4, 8, 16, 32, 64, 128):
        exact = np_gaussian_ode_gain(s2, n)
        h = samplers.heun(gaussian_oracle(s2), z, num_steps=n, clip=False).item()
        d = samplers.ddim(gaussian_oracle(s2), z, num_steps=n, clip=False).item()
        assert d == pytest.approx(np_gaussian_ddim_gain(s2, n), rel=1e-10)
        errs_h.append(abs(h - exact))
        errs_d.append(abs(d - exact))
    assert all(eh < ed / 3 for eh, ed in zip(errs_h, errs_d, strict=True)), (errs_h, errs_d)
    assert errs_h[-1] / errs_h[-2] < 0.4 < errs_d[-1] / errs_d[-2], (errs_h, errs_d)
