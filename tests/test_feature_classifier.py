"""pd_core.metrics: the offline feature classifier (deterministic training, its metric's ranking, caching of
weights and reference features)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pd_core import images, metrics
from tests.metrics_data import FMNIST, LinearExtractor, _fmnist


@pytest.fixture(scope="session")
def fmnist_test():
    if not FMNIST.exists():
        pytest.skip(f"Fashion-MNIST IDX files not found under {FMNIST}")
    return _fmnist("test")


@pytest.fixture(scope="session")
def quick_classifier(fmnist_test):
    """A classifier trained for one epoch on 10k training images: enough to rank degradations."""
    x, y = _fmnist("train")
    tx, ty = fmnist_test
    model, acc = metrics.train_feature_classifier(x[:10000], y[:10000], tx[:2000], ty[:2000], epochs=1, seed=0)
    return metrics.ClassifierFeatures(model, dataset="fashion_mnist"), acc


def test_classifier_training_is_deterministic_and_handles_three_channels_and_size_8():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 4, (64,), generator=g)
    (m1, a1), (m2, a2) = (metrics.train_feature_classifier(x, y, x, y, epochs=1, batch_size=16, seed=3)
                          for _ in range(2))
    assert a1 == a2
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k
    feats = metrics.ClassifierFeatures(m1, dataset="toy")(images.to_uint8(x))
    assert feats.shape == (64, 128)


@pytest.mark.slow
def test_classifier_metric_ranks_clean_noisy_blurred(quick_classifier, fmnist_test):
    extractor, accuracy = quick_classifier
    assert accuracy > 0.8
    assert extractor.fd_name == "fd_fashion_mnist" and extractor.kid_name == "kid_fashion_mnist"
    tx, _ = fmnist_test
    ref = metrics.extract_features(extractor, tx[:2000])
    ref_stats = metrics.FeatureStats.from_features(ref)
    clean = images.from_uint8(tx[2000:4000])  # (N, 1, 28, 28) in [-1, 1]
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(clean, (2, 2, 2, 2), mode="replicate"), 5, stride=1)  # 5x5 box blur
    fds, kids = [], []
    for imgs in (clean, noisy, blurred):
        f = metrics.extract_features(extractor, imgs)
        fds.append(metrics.frechet_distance_stats(metrics.FeatureStats.from_features(f), ref_stats))
        kids.append(metrics.kernel_inception_distance(f, ref, subsets=20, subset_size=1000)[0])
    assert fds[0] < fds[1] < fds[2], fds
    assert kids[0] < kids[1] < kids[2], kids


def test_load_or_train_classifier_caches_weights_and_manifest():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(48, 1, 10, 10, generator=g) * 2 - 1, torch.randint(0, 3, (48,), generator=g)
    store = metrics.MemoryByteStore()
    calls = []

    def load_data():
        calls.append(1)
        return x, y, x, y

    kw = dict(dataset="toy", seed=1, epochs=1, batch_size=16)
    first = metrics.load_or_train_classifier(store, "eval/classifier", load_data=load_data, **kw)
    manifest = json.loads(store.get_bytes("eval/classifier/manifest.json"))
    assert manifest["test_accuracy"] == first.test_accuracy and manifest["seed"] == 1
    assert manifest["dataset"] == "toy" and len(manifest["sha256"]) == 64
    second = metrics.load_or_train_classifier(store, "eval/classifier", load_data=load_data, **kw)
    assert len(calls) == 1  # the second call loaded from the store without touching the data
    u = images.to_uint8(x)
    assert torch.equal(first(u), second(u))
    with pytest.raises(ValueError, match="other settings"):
        metrics.load_or_train_classifier(store, "eval/classifier", load_data=load_data, **{**kw, "seed": 2})
    store.put_bytes("eval/classifier/weights.safetensors", b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        metrics.load_or_train_classifier(store, "eval/classifier", load_data=load_data, **kw)


def test_reference_features_are_cached_per_extractor():
    x = torch.rand(30, 1, 8, 8) * 2 - 1
    store, extractor = metrics.MemoryByteStore(), LinearExtractor(64)
    ref = metrics.load_or_compute_reference(store, "ref/test", extractor=extractor, images=x, extractor_id="a")
    assert ref.features.shape == (30, 8) and ref.stats.n == 30

    def fail():
        raise AssertionError("images must not be loaded on a cache hit")

    hit = metrics.load_or_compute_reference(store, "ref/test", extractor=extractor, images=fail, extractor_id="a")
    np.testing.assert_array_equal(hit.features, ref.features)
    np.testing.assert_array_equal(hit.stats.cov, ref.stats.cov)
    miss = metrics.load_or_compute_reference(store, "ref/test", extractor=extractor, images=lambda: x[:20],
                                             extractor_id="b")
    assert miss.stats.n == 20
