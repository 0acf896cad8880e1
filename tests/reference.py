"""Independent float64 numpy references of the schedule (DESIGN section 2), shared by the math tests."""

from __future__ import annotations

import numpy as np

LMIN, LMAX = -20.0, 20.0


def np_logsnr(t, lmin: float = LMIN, lmax: float = LMAX) -> np.ndarray:
    """b = arctan(exp(-lmax/2)), a = arctan(exp(-lmin/2)) - b, lambda = -2 log tan(a t + b)."""
    b = np.arctan(np.exp(-lmax / 2))
    a = np.arctan(np.exp(-lmin / 2)) - b
    return -2.0 * np.log(np.tan(a * np.asarray(t, dtype=np.float64) + b))


def np_alpha_sigma(lam) -> tuple[np.ndarray, np.ndarray]:
    """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda))."""
    lam = np.asarray(lam, dtype=np.float64)
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
