"""pd_core.metrics: KID's unbiased MMD against its brute-force definition; precision and recall on covered,
shifted and collapsed sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import metrics


def test_mmd_matches_brute_force_definition():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.2
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    got = metrics.polynomial_mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_zero_within_std_for_one_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(1500, 32)), rng.normal(size=(1500, 32))
    mean, std = metrics.kernel_inception_distance(a, b, subsets=50, subset_size=500)
    assert abs(mean) <= 3 * std
    shifted_mean, shifted_std = metrics.kernel_inception_distance(a, b + 0.5, subsets=50, subset_size=500)
    assert shifted_mean > 10 * max(shifted_std, std) and shifted_mean > 10 * abs(mean)
    # same seed -> same subsets -> same numbers
    assert metrics.kernel_inception_distance(a, b, subsets=50, subset_size=500) == (mean, std)


def test_kid_caps_subset_size_at_the_smaller_set():
    rng = np.random.default_rng(8)
    mean, std = metrics.kernel_inception_distance(rng.normal(size=(40, 5)), rng.normal(size=(60, 5)), subsets=5)
    assert np.isfinite(mean) and np.isfinite(std)


def test_precision_recall_on_covered_shifted_and_collapsed_sets():
    rng = np.random.default_rng(9)
    centres = np.array([[0.0, 0.0], [10.0, 0.0]])
    real = np.concatenate([c + rng.normal(size=(300, 2)) for c in centres])
    same = np.concatenate([c + rng.normal(size=(300, 2)) for c in centres])
    p, r = metrics.precision_recall(real, same, k=3)
    assert p > 0.9 and r > 0.9
    p, r = metrics.precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    collapsed = centres[0] + rng.normal(size=(600, 2))  # only one of the two modes
    p, r = metrics.precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.6
