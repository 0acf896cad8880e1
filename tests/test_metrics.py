"""Tests for pd_core.metrics and pd_core.images."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as save_safetensors

from pd_core import images, metrics
from pd_core.metrics.inception import FID_WEIGHTS_FILE
from pd_core.metrics.table import summary_view

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- data helpers
def _idx(path: Path, offset: int) -> np.ndarray:
    """IDX payload after its header (16 bytes for images, 8 for labels)."""
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _fmnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST split as (uint8 images (N, 1, 28, 28), int64 labels (N,))."""
    prefix = "train" if split == "train" else "t10k"
    x = _idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y = _idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


class LinearExtractor:
    """A fixed random projection: a cheap feature extractor for evaluation tests."""

    fd_name, kid_name = "fd_test", "kid_test"

    def __init__(self, in_dim: int, out_dim: int = 8):
        self.w = torch.randn(in_dim, out_dim, generator=torch.Generator().manual_seed(0))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return images.from_uint8(u).flatten(1) @ self.w


# ----------------------------------------------------------------------------- Frechet distance
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


# ----------------------------------------------------------------------------- feature statistics
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


# ----------------------------------------------------------------------------- KID, precision/recall
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


# ----------------------------------------------------------------------------- images
def test_uint8_quantisation_is_round_half_up_and_clipped():
    k = torch.arange(256, dtype=torch.float64)
    halves = ((k + 0.5) / 127.5 - 1.0).float()  # exactly between two levels (up to float32)
    x = torch.cat([torch.linspace(-1.3, 1.3, 1001), halves, torch.tensor([-1.0, 1.0])])
    expected = np.clip(np.floor((x.numpy().astype(np.float32) + 1) * 127.5 + 0.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images.to_uint8(x).numpy(), expected)
    assert images.to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="non-finite"):
        images.to_uint8(torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_quantisation_equals_png_roundtrip(tmp_path, channels):
    x = torch.rand(1, channels, 9, 7, generator=torch.Generator().manual_seed(channels)) * 2.2 - 1.1
    url = images.write_grid(x, str(tmp_path / "one.png"), padding=0)
    png = np.asarray(Image.open(url))
    png = png[:, :, None] if png.ndim == 2 else png  # (H, W, C)
    np.testing.assert_array_equal(png, images.to_uint8(x)[0].permute(1, 2, 0).numpy())


def test_sample_grid_layout_through_fsspec():
    x = torch.rand(5, 3, 4, 6) * 2 - 1
    url = images.write_grid(x, "memory://pd-tests/grids/grid.png", padding=1)
    grid = images.read_png(url)  # (3, H, W)
    assert grid.shape == (3, 2 * (4 + 1) + 1, 3 * (6 + 1) + 1)  # ceil(sqrt(5)) = 3 columns, 2 rows
    u = images.to_uint8(x)
    assert torch.equal(grid[:, 1:5, 1:7], u[0]) and torch.equal(grid[:, 6:10, 8:14], u[4])


# ----------------------------------------------------------------------------- Inception
def _random_inception() -> metrics.FIDInceptionV3:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = metrics.FIDInceptionV3()
        for m in model.modules():  # non-trivial BN statistics, so a wrong load would change features
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_inception_has_pytorch_fid_weight_names():
    sd = metrics.FIDInceptionV3().state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.bias"):
        assert key in sd
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert len(sd) == 566  # torchvision Inception3 (no aux) with pytorch-fid's FID blocks


@pytest.mark.slow
def test_inception_loads_strict_from_path_and_memory_and_gives_2048_features(tmp_path):
    model = _random_inception()
    sd = model.state_dict()
    pth = tmp_path / FID_WEIGHTS_FILE
    torch.save(sd, pth)
    loaded = metrics.load_inception(str(pth))
    u = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = loaded(u)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and bool(torch.isfinite(feats).all())
    assert torch.equal(feats, model(u))
    # safetensors through fsspec memory://, an old-style file without BN counters, and a sha256 check
    old_style = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with fsspec.open("memory://pd-tests/inception/w.safetensors", "wb") as f:
        f.write(save_safetensors(old_style))
    digest = hashlib.sha256(save_safetensors(old_style)).hexdigest()
    mem = metrics.load_inception("memory://pd-tests/inception/w.safetensors", sha256=digest)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(metrics.InceptionWeightsError, match="sha256"):
        metrics.load_inception("memory://pd-tests/inception/w.safetensors", sha256="0" * 64)


def test_inception_strict_load_refuses_wrong_keys(tmp_path):
    sd = metrics.FIDInceptionV3().state_dict()
    sd["Mixed_7c.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        metrics.load_inception(str(tmp_path / "bad.pth"))


def test_missing_inception_weights_say_what_to_get_and_where_to_point():
    for weights in (None, "/nonexistent/dir/pt_inception.pth"):
        with pytest.raises(metrics.InceptionWeightsError) as err:
            metrics.load_inception(weights)
        msg = str(err.value)
        assert FID_WEIGHTS_FILE in msg and "eval.inception_weights" in msg and "pytorch-fid" in msg
        assert "\n" not in msg


class _NotATensor:
    pass


def test_weight_files_cannot_execute_code(tmp_path):
    torch.save({"x": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        metrics.read_state_dict(str(tmp_path / "evil.pth"))


# ----------------------------------------------------------------------------- the feature classifier
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


# ----------------------------------------------------------------------------- evaluation
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


# ----------------------------------------------------------------------------- quality table
def _records():
    rows = []
    for steps in (1, 2, 4):
        rows.append({"sampler": "teacher_ddim", "steps": steps, "n_samples": 1000, "seconds_per_image": 0.01 * steps,
                     "fd_fashion_mnist": 10.0 / steps, "kid_fashion_mnist": 0.1 / steps})
        for gamma, fd in ((0.1, 9.0 / steps), (0.3, 8.0 / steps)):
            rows.append({"sampler": "teacher_stochastic", "steps": steps, "gamma": gamma, "n_samples": 1000,
                         "seconds_per_image": 0.01 * steps, "fd_fashion_mnist": fd, "kid_fashion_mnist": 0.1})
        rows.append({"sampler": "distilled", "steps": steps, "n_samples": 1000, "seconds_per_image": 0.01 * steps,
                     "fd_fashion_mnist": 5.0 / steps, "kid_fashion_mnist": 0.05 / steps, "uri": "s3://x"})
    rows.append({"sampler": "floor", "steps": None, "n_samples": 1000, "fd_fashion_mnist": 0.5,
                 "kid_fashion_mnist": 0.0001})
    return rows


def test_quality_table_has_one_row_per_step_count_with_best_gamma_and_floor():
    df = metrics.quality_table(_records())
    assert df["steps"].tolist() == [1, 2, 4]
    for col in ("teacher_ddim_fd_fashion_mnist", "teacher_stochastic_fd_fashion_mnist", "teacher_stochastic_gamma",
                "distilled_fd_fashion_mnist", "distilled_seconds_per_image", "floor_fd_fashion_mnist",
                "floor_kid_fashion_mnist"):
        assert col in df.columns, col
    assert df["teacher_stochastic_gamma"].tolist() == [0.3, 0.3, 0.3]
    assert df["teacher_stochastic_fd_fashion_mnist"].tolist() == [8.0, 4.0, 2.0]
    assert df["floor_fd_fashion_mnist"].tolist() == [0.5, 0.5, 0.5]
    assert not any("uri" in c for c in df.columns)


def test_quality_long_format_columns():
    long = metrics.quality_long(_records())
    assert list(long.columns) == ["sampler", "steps", "metric", "value", "n_samples", "seconds_per_image"]
    gammas = long[(long.sampler == "teacher_stochastic") & (long.metric == "gamma")]
    assert gammas["value"].tolist() == [0.3, 0.3, 0.3]
    floor = long[long.sampler == "floor"]
    assert floor["steps"].isna().all() and set(floor["metric"]) == {"fd_fashion_mnist", "kid_fashion_mnist"}


def test_metrics_never_import_prefect_or_mlflow():
    code = ("import sys, pd_core.metrics, pd_core.images; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'torchvision')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
