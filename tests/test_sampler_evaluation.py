"""pd_core.metrics: a sampler's evaluation (per-example noise, independent of batching; sample accuracy;
records per guidance weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import images, metrics
from pd_core.metrics.table import summary_view
from tests.metrics_data import LinearExtractor


def test_noise_is_per_example_and_independent_of_batching():
    a = metrics.sample_noise(seed=5, start=0, count=10, shape=(1, 4, 4))
    b = torch.cat([metrics.sample_noise(seed=5, start=0, count=3, shape=(1, 4, 4)),
                   metrics.sample_noise(seed=5, start=3, count=7, shape=(1, 4, 4))])
    assert torch.equal(a, b)
    assert not torch.equal(a, metrics.sample_noise(seed=6, start=0, count=10, shape=(1, 4, 4)))


def test_evaluate_sampler_returns_metrics_independent_of_batch_size():
    shape = (1, 6, 6)
    extractor = LinearExtractor(36)
    ref = metrics.extract_features(extractor, torch.rand(200, *shape) * 2 - 1)
    ref_stats = metrics.FeatureStats.from_features(ref)
    sample_fn = lambda z: torch.tanh(z)  # noqa: E731  a deterministic "sampler"
    seen = []
    kw = dict(num_samples=50, seed=0, feature_extractor=extractor, reference_stats=ref_stats, image_shape=shape,
              reference_features=ref, kid_subsets=10)
    out = metrics.evaluate_sampler(sample_fn, batch_size=16, progress=lambda d, t: seen.append((d, t)), **kw)
    assert seen == [(16, 50), (32, 50), (48, 50), (50, 50)]
    assert set(out) == {"fd_test", "kid_test", "kid_test_std", "precision", "recall", "n_samples",
                        "seconds_per_image"}
    assert out["fd_test"] > 0 and out["seconds_per_image"] > 0
    again = metrics.evaluate_sampler(sample_fn, batch_size=7, **kw)  # same noise per example
    for k in ("fd_test", "kid_test", "precision", "recall"):
        assert again[k] == pytest.approx(out[k], rel=1e-9), k  # only the summation order differs
    # sub-quantum differences vanish: metrics see images exactly as a PNG stores them
    nudged = metrics.evaluate_sampler(lambda z: images.from_uint8(images.to_uint8(torch.tanh(z))) + 0.3 / 127.5,
                                      batch_size=16, **kw)
    assert nudged["fd_test"] == out["fd_test"] and nudged["kid_test"] == out["kid_test"]


def test_sample_accuracy_scores_each_sample_against_the_class_it_asked_for():
    """Example i asks for class i mod K whatever the batching; the score is the fraction the classifier puts there."""
    k, n, shape = 4, 50, (1, 6, 6)
    extractor = LinearExtractor(36)
    ref = metrics.extract_features(extractor, torch.rand(100, *shape) * 2 - 1)
    seen: list[torch.Tensor] = []

    def sample_fn(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(labels.clone())
        wrong = z[:, 0, 0, 0] > 0.8  # these samples come out as the next class
        shown = torch.where(wrong, (labels + 1) % k, labels)
        return ((shown.double() - 1.5) / 2).reshape(-1, 1, 1, 1).expand(-1, *shape).float()

    def decode(u: torch.Tensor) -> torch.Tensor:
        return torch.round(images.from_uint8(u)[:, 0, 0, 0] * 2 + 1.5).long()

    noise = metrics.sample_noise(seed=3, start=0, count=n, shape=shape).numpy()
    want = float(np.mean(noise[:, 0, 0, 0] <= 0.8))
    assert 0.5 < want < 1.0
    kw = dict(num_samples=n, seed=3, feature_extractor=extractor, image_shape=shape, num_classes=k,
              reference_stats=metrics.FeatureStats.from_features(ref), label_classifier=decode)
    out = metrics.evaluate_sampler(sample_fn, batch_size=16, **kw)
    assert out["sample_accuracy"] == want
    assert torch.cat(seen).tolist() == [i % k for i in range(n)]
    assert metrics.evaluate_sampler(sample_fn, batch_size=7, **kw)["sample_accuracy"] == want
    without = metrics.evaluate_sampler(lambda z: torch.tanh(z), batch_size=16, **{**kw, "num_classes": None})
    assert "sample_accuracy" not in without


def test_records_at_guidance_weights_are_kept_apart_in_both_tables():
    rows = [{"sampler": "teacher_ddim", "steps": 4, "w": w, "n_samples": 10, "seconds_per_image": 0.1,
             "fd_x": 10.0 + w, "sample_accuracy": 0.5 + w / 10} for w in (0.0, 2.0)]
    rows.append({"sampler": "floor", "steps": None, "n_samples": 10, "fd_x": 1.0})
    wide = metrics.quality_table(rows)
    assert wide["teacher_ddim_w0_fd_x"].tolist() == [10.0] and wide["teacher_ddim_w2_fd_x"].tolist() == [12.0]
    assert "teacher_ddim_w2_sample_accuracy" in summary_view(wide).columns
    long = metrics.quality_long(rows)
    assert list(long.columns) == ["sampler", "steps", "w", "metric", "value", "n_samples", "seconds_per_image"]
    acc = long[long.metric == "sample_accuracy"].set_index("w").value.to_dict()
    assert acc == {0.0: 0.5, 2.0: 0.7}
    assert long[long.sampler == "floor"].w.isna().all()
