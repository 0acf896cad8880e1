"""pd_core.metrics: feature statistics, streamed or one-shot, saved and loaded through fsspec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import metrics


def test_streaming_stats_equal_one_shot():
    rng = np.random.default_rng(4)
    feats = 1000.0 + rng.normal(size=(1037, 12)) @ rng.normal(size=(12, 12))  # |mean| >> std on purpose
    one = metrics.FeatureStats.from_features(feats)
    acc = metrics.StreamingStats()
    for chunk in np.array_split(feats, [1, 100, 101, 500, 900]):  # uneven, including a 1-row batch
        acc.update(torch.from_numpy(chunk))
    streamed = acc.finalize()
    assert streamed.n == one.n == 1037
    np.testing.assert_allclose(streamed.mean, one.mean, rtol=1e-13)
    np.testing.assert_allclose(streamed.cov, one.cov, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("where", ["path", "memory"])
def test_stats_save_and_load_roundtrip(tmp_path, where):
    s = metrics.FeatureStats.from_features(np.random.default_rng(5).normal(size=(50, 6)))
    url = str(tmp_path / "ref.npz") if where == "path" else "memory://pd-tests/stats/ref.npz"
    s.save(url)
    back = metrics.FeatureStats.load(url)
    assert back.n == 50
    np.testing.assert_array_equal(back.mean, s.mean)
    np.testing.assert_array_equal(back.cov, s.cov)
