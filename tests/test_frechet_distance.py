"""pd_core.metrics: the Frechet distance against closed forms and scipy's sqrtm (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from pd_core import metrics
from tests.metrics_data import _spd


def test_fd_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    s = metrics.FeatureStats.from_features(feats)
    assert metrics.frechet_distance(s.mean, s.cov, s.mean, s.cov) == pytest.approx(0.0, abs=1e-9)


def test_fd_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    v1, v2 = rng.uniform(0.1, 3.0, size=10), rng.uniform(0.1, 3.0, size=10)
    # d^2 = |mu1 - mu2|^2 + sum(v1 + v2 - 2 sqrt(v1 v2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)
    # torch inputs (float32, any device) give the same float64 result up to the input rounding
    got_t = metrics.frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(v1)), torch.tensor(mu2),
                                     torch.tensor(np.diag(v2)))
    assert got_t == pytest.approx(expected, rel=1e-12)


def test_fd_of_full_covariances_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    d = 24
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fd_is_symmetric_and_handles_rank_deficient_covariances():
    rng = np.random.default_rng(3)
    a = metrics.FeatureStats.from_features(rng.normal(size=(20, 64)))  # D > N: singular covariances
    b = metrics.FeatureStats.from_features(rng.normal(size=(20, 64)) + 0.3)
    ab, ba = metrics.frechet_distance_stats(a, b), metrics.frechet_distance_stats(b, a)
    assert np.isfinite(ab) and ab > 0
    assert ab == pytest.approx(ba, rel=1e-8)
    assert metrics.frechet_distance_stats(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
