"""pd_core.data: IDX / CIFAR binary / npz / folder / digits loaders over file and memory://, errors, sampler."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from pd_core import data as D
from pd_core.config import DataConfig
from pd_core.data import BatchSampler, DatasetError, ImageData, load_split, locate

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------ file builders

def idx_images(images: np.ndarray) -> bytes:
    """IDX3 bytes: magic 2051, N, H, W (big-endian), then the pixels."""
    n, h, w = images.shape
    header = (2051).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in (n, h, w))
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    """IDX1 bytes: magic 2049, N, then the labels."""
    return (2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()


def put(url: str, payload: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, payload)


def write_idx_dir(root: str, *, n_train: int = 12, n_test: int = 5, size: int = 28, gz: bool = True) -> dict:
    """A Fashion-MNIST-like directory; returns the arrays written."""
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = RNG.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=n, dtype=np.uint8)
        for name, payload in ((f"{prefix}-images-idx3-ubyte", idx_images(images)),
                              (f"{prefix}-labels-idx1-ubyte", idx_labels(labels))):
            put(D.join_url(root, name + (".gz" if gz else "")), gzip.compress(payload) if gz else payload)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def mem_root():
    root = f"memory://pd-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path, mem_root) -> str:
    return str(tmp_path / "ds") if request.param == "file" else mem_root


def expected_unit(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8.astype(np.float32) / 127.5 - 1.0)


# ------------------------------------------------------------------------------------ IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_loads_pads_and_scales(root: str, gz: bool) -> None:
    arrays = write_idx_dir(root, gz=gz)
    train = load_split(DataConfig(name="fashion_mnist", url=root, image_size=32), split="train")
    images, labels = arrays["train"]
    assert train.images.shape == (12, 1, 32, 32) and train.images.dtype == torch.float32
    assert train.num_classes == 10 and train.name == "fashion_mnist"
    assert torch.equal(train.labels, torch.from_numpy(labels.astype(np.int64)))
    # 28 -> 32: two rows/columns of black (-1) on each side, the image untouched in the middle
    assert torch.all(train.images[:, :, :2] == -1) and torch.all(train.images[:, :, :, -2:] == -1)
    assert torch.allclose(train.images[:, 0, 2:30, 2:30], expected_unit(images))
    test = load_split(DataConfig(name="mnist", url=root, image_size=28), split="test")
    assert test.images.shape == (5, 1, 28, 28)
    assert test.images.min() >= -1 and test.images.max() <= 1


def test_idx_scaling_endpoints(tmp_path: Path) -> None:
    write_idx_dir(str(tmp_path))
    raw = np.zeros((2, 28, 28), np.uint8)
    raw[1] = 255
    put(str(tmp_path / "train-images-idx3-ubyte.gz"), gzip.compress(idx_images(raw)))
    put(str(tmp_path / "train-labels-idx1-ubyte.gz"), gzip.compress(idx_labels(np.array([3, 4]))))
    data = load_split(DataConfig(name="fashion_mnist", url=str(tmp_path), image_size=28), split="train")
    assert torch.all(data.images[0] == -1) and torch.all(data.images[1] == 1)


def test_limit_cuts_training_split_only(tmp_path: Path) -> None:
    write_idx_dir(str(tmp_path))
    cfg = DataConfig(name="fashion_mnist", url=str(tmp_path), image_size=28, limit=4)
    assert len(load_split(cfg, split="train")) == 4
    assert len(load_split(cfg, split="test")) == 5


def test_idx_wrong_magic_names_the_file(tmp_path: Path) -> None:
    write_idx_dir(str(tmp_path))
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(labels.read_bytes())  # labels where images belong
    with pytest.raises(DatasetError) as info:
        load_split(DataConfig(name="fashion_mnist", url=str(tmp_path), image_size=28), split="train")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "magic number 2049, expected 2051" in message


@pytest.mark.parametrize("cut", [3, 10, 100])
def test_idx_truncated_names_the_file(tmp_path: Path, cut: int) -> None:
    write_idx_dir(str(tmp_path), gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-cut] if cut != 3 else path.read_bytes()[:3])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*truncated"):
        load_split(DataConfig(name="fashion_mnist", url=str(tmp_path), image_size=28), split="test")


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    write_idx_dir(str(tmp_path))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz is a truncated or corrupt gzip"):
        load_split(DataConfig(name="fashion_mnist", url=str(tmp_path), image_size=28), split="test")


def test_idx_oversized_file(tmp_path: Path) -> None:
    write_idx_dir(str(tmp_path), gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match="longer than its header says"):
        load_split(DataConfig(name="fashion_mnist", url=str(tmp_path), image_size=28), split="test")


def test_idx_count_mismatch_names_both_files(mem_root: str) -> None:
    write_idx_dir(mem_root)
    put(D.join_url(mem_root, "t10k-labels-idx1-ubyte.gz"), gzip.compress(idx_labels(np.arange(4))))
    with pytest.raises(DatasetError) as info:
        load_split(DataConfig(name="fashion_mnist", url=mem_root, image_size=28), split="test")
    assert "t10k-images-idx3-ubyte.gz has 5 images" in str(info.value)
    assert "t10k-labels-idx1-ubyte.gz has 4 labels" in str(info.value)


def test_wrong_size_images_are_refused(tmp_path: Path) -> None:
    write_idx_dir(str(tmp_path), size=28)
    with pytest.raises(DatasetError, match="images are 28x28 and cannot be made 16x16"):
        load_split(DataConfig(name="fashion_mnist", url=str(tmp_path), image_size=16), split="test")


def test_missing_default_location_says_how_to_get_the_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(locate, "FASHION_MNIST_DEFAULT_DIR", str(tmp_path / "absent"))  # where it is read
    cfg = DataConfig(name="fashion_mnist", image_size=28, download_dir=str(tmp_path / "dl"))
    with pytest.raises(DatasetError) as info:
        load_split(cfg, split="train")
    message = str(info.value)
    assert "\n" not in message
    for needle in ("absent/train-images-idx3-ubyte.gz does not exist", "apt-get install dataset-fashion-mnist",
                   "data.url", "data.download=true"):
        assert needle in message
    assert not (tmp_path / "dl").exists()  # nothing is downloaded unless asked


# ------------------------------------------------------------------------------------ downloads (no network)

def test_fetch_verified_checks_sha256(tmp_path: Path, mem_root: str) -> None:
    source = tmp_path / "file.bin"
    source.write_bytes(b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    dest = D.join_url(mem_root, "copy.bin")
    with pytest.raises(DatasetError, match=f"file.bin has sha256 {good}, expected {'0' * 64}"):
        D.fetch_verified(str(source), dest, sha256="0" * 64)
    assert not D.url_exists(dest)
    D.fetch_verified(str(source), dest, sha256=good)
    assert D.read_bytes(dest) == b"payload"


def test_download_from_mirror_refuses_wrong_checksums(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    write_idx_dir(str(mirror))  # right names, but not the official bytes
    cfg = DataConfig(name="fashion_mnist", url=str(tmp_path / "dest"), image_size=28, download=True,
                     mirror=str(mirror))
    with pytest.raises(DatasetError, match="has sha256 .* expected 3aede38d"):
        load_split(cfg, split="train")
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def pin(monkeypatch, name: str, folder: Path) -> None:
    """Pin the sha256 of the files in ``folder`` as if they were the official ones."""
    files = tuple(D.RemoteFile(p.name, f"https://invalid.example/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest(),
                               p.stat().st_size) for p in sorted(folder.iterdir()))
    monkeypatch.setitem(D.OFFICIAL_FILES, name, files)


def test_download_from_mirror_with_matching_checksums(tmp_path: Path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    arrays = write_idx_dir(str(mirror))
    pin(monkeypatch, "mnist", mirror)
    cfg = DataConfig(name="mnist", image_size=28, download=True, mirror=str(mirror),
                     download_dir=str(tmp_path / "dl"))
    data = load_split(cfg, split="test")
    assert torch.equal(data.labels, torch.from_numpy(arrays["test"][1].astype(np.int64)))
    assert (tmp_path / "dl" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert not list((tmp_path / "dl" / "mnist").glob("*.partial-*"))


# ------------------------------------------------------------------------------------ CIFAR-10 binary

def cifar_records(n: int, *, label_offset: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    images = RNG.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = (np.arange(n) + label_offset) % 10
    raw = b"".join(bytes([labels[i]]) + images[i].tobytes() for i in range(n))
    return raw, images, labels


def write_cifar(root: str, *, subdir: str = "") -> dict:
    out = {}
    base = D.join_url(root, subdir) if subdir else root
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        raw, images, labels = cifar_records(2, label_offset=i)
        put(D.join_url(base, name), raw)
        out[name] = (images, labels)
    return out


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-bin"])
def test_cifar_binary(root: str, subdir: str) -> None:
    written = write_cifar(root, subdir=subdir)
    train = load_split(DataConfig(name="cifar10", url=root, image_size=32), split="train")
    assert train.images.shape == (10, 3, 32, 32) and train.num_classes == 10
    images, labels = written["data_batch_1.bin"]
    assert torch.allclose(train.images[:2], expected_unit(images))  # record bytes are R, G, B planes
    assert train.labels[:2].tolist() == labels.tolist()
    assert len(load_split(DataConfig(name="cifar10", url=root, image_size=32), split="test")) == 2


def test_cifar_truncated_record(tmp_path: Path) -> None:
    write_cifar(str(tmp_path))
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="test_batch.bin has 6145 bytes, not a whole number of 3073-byte"):
        load_split(DataConfig(name="cifar10", url=str(tmp_path), image_size=32), split="test")


def test_cifar_bad_label(tmp_path: Path) -> None:
    write_cifar(str(tmp_path))
    raw = bytearray((tmp_path / "test_batch.bin").read_bytes())
    raw[0] = 57
    (tmp_path / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="test_batch.bin has label 57"):
        load_split(DataConfig(name="cifar10", url=str(tmp_path), image_size=32), split="test")


def test_cifar_download_extracts_only_the_binaries(tmp_path: Path, monkeypatch) -> None:
    staged = tmp_path / "staged"
    write_cifar(str(staged))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for path in sorted(staged.iterdir()):
            tar.add(path, arcname=f"cifar-10-batches-bin/{path.name}")
        evil = tarfile.TarInfo("../../evil.txt")  # never extracted: only known member names are read
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    pin(monkeypatch, "cifar10", mirror)
    dest = tmp_path / "cifar"
    cfg = DataConfig(name="cifar10", url=str(dest), image_size=32, download=True, mirror=str(mirror))
    assert load_split(cfg, split="test").images.shape == (2, 3, 32, 32)
    assert (dest / "cifar-10-batches-bin" / "data_batch_5.bin").exists()
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


# ------------------------------------------------------------------------------------ npz

def save_npz(url: str, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    put(url, buffer.getvalue())


@pytest.mark.parametrize("layout", ["hwc", "chw", "gray"])
def test_npz_directory_layouts(root: str, layout: str) -> None:
    n, c = 6, 1 if layout == "gray" else 3
    chw = RNG.integers(0, 256, size=(n, c, 16, 16), dtype=np.uint8)
    stored = {"hwc": chw.transpose(0, 2, 3, 1), "chw": chw, "gray": chw[:, 0]}[layout]
    labels = np.arange(n) % 3
    save_npz(D.join_url(root, "train.npz"), images=stored, labels=labels)
    save_npz(D.join_url(root, "test.npz"), x=stored[:2], y=labels[:2])
    train = load_split(DataConfig(name="npz", url=root, image_size=16), split="train")
    assert train.images.shape == (n, c, 16, 16) and train.num_classes == 3
    assert torch.allclose(train.images, expected_unit(chw))
    assert load_split(DataConfig(name="npz", url=root, image_size=16), split="test").labels.tolist() == [0, 1]


def test_npz_single_file_with_splits_pads(mem_root: str) -> None:
    url = D.join_url(mem_root, "mnist.npz")  # the Keras layout: x_train, y_train, x_test, y_test
    save_npz(url, x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.arange(4), x_test=np.zeros((2, 28, 28), np.uint8),
             y_test=np.arange(2))
    test = load_split(DataConfig(name="npz", url=url, image_size=32), split="test")
    assert test.images.shape == (2, 1, 32, 32) and torch.all(test.images == -1)


def test_npz_unlabelled(mem_root: str) -> None:
    url = D.join_url(mem_root, "x.npz")
    save_npz(url, images=np.zeros((3, 8, 8, 3), np.uint8))
    data = load_split(DataConfig(name="npz", url=url, image_size=8), split="train")
    assert data.labels is None and data.num_classes == 0
    with pytest.raises(DatasetError, match="none of x_test/y_test"):
        load_split(DataConfig(name="npz", url=url, image_size=8), split="test")


@pytest.mark.parametrize("arrays, expected", [
    ({"images": np.zeros((2, 8, 8), np.float32)}, "images must be uint8"),
    ({"images": np.zeros((2, 8, 8, 5), np.uint8)}, "expected \\(N, H, W\\)"),
    ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.arange(3)}, "must be 2 integer labels"),
    ({"images": np.array([object(), object()], dtype=object)}, "not a readable .npz of plain arrays"),
])
def test_npz_errors(mem_root: str, arrays: dict, expected: str) -> None:
    url = D.join_url(mem_root, "bad.npz")
    save_npz(url, **arrays)
    with pytest.raises(DatasetError, match=expected):
        load_split(DataConfig(name="npz", url=url, image_size=8), split="train")


# ------------------------------------------------------------------------------------ image folders

def write_folder(root: str, *, splits: bool = True, size: int = 8, mode: str = "L") -> None:
    from PIL import Image

    for split in ("train", "test") if splits else ("",):
        for cls, count in (("cat", 3), ("dog", 2)):
            for i in range(count):
                shape = (size, size) if mode == "L" else (size, size, 3)
                img = Image.fromarray(RNG.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
                buffer = io.BytesIO()
                img.save(buffer, format="PNG")
                parts = [p for p in (split, cls, f"{i}.png") if p]
                put(D.join_url(root, *parts), buffer.getvalue())


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_folder(root: str, mode: str, channels: int) -> None:
    write_folder(root, mode=mode)
    data = load_split(DataConfig(name="folder", url=root, image_size=8), split="train")
    assert data.images.shape == (5, channels, 8, 8) and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1]  # classes in sorted folder order
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert len(load_split(DataConfig(name="folder", url=root, image_size=8), split="test")) == 5


def test_folder_without_split_folders(tmp_path: Path) -> None:
    write_folder(str(tmp_path), splits=False, size=16)
    cfg = DataConfig(name="folder", url=str(tmp_path), image_size=8)  # 16 -> 8 by 2x2 average pooling
    assert load_split(cfg, split="train").images.shape == (5, 1, 8, 8)
    with pytest.raises(DatasetError, match="no train/ and test/ split folders"):
        load_split(cfg, split="test")


def test_folder_wrong_size_and_bad_file(tmp_path: Path) -> None:
    write_folder(str(tmp_path), size=10)
    with pytest.raises(DatasetError, match="images are 10x10 and cannot be made 8x8"):
        load_split(DataConfig(name="folder", url=str(tmp_path), image_size=8), split="train")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png is not a readable image"):
        load_split(DataConfig(name="folder", url=str(tmp_path), image_size=16), split="train")


# ------------------------------------------------------------------------------------ digits, shaping

def test_digits() -> None:
    train = load_split(DataConfig(name="digits", image_size=8), split="train")
    test = load_split(DataConfig(name="digits", image_size=8), split="test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 8, 8)
    assert train.images.min() == -1 and train.images.max() == 1
    assert set(test.labels.tolist()) == set(range(10))
    assert load_split(DataConfig(name="digits", image_size=16), split="test").images.shape == (len(test), 1, 16, 16)


def test_fit_to_size() -> None:
    x = torch.ones(2, 1, 28, 28)
    padded = D.fit_to_size(x, size=32, source="t")
    assert padded.shape == (2, 1, 32, 32) and padded.sum() == 2 * (28 * 28 - (32 * 32 - 28 * 28))
    pooled = D.fit_to_size(torch.arange(16.0).reshape(1, 1, 4, 4), size=2, source="t")
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(DatasetError, match="t: images are 40x40"):
        D.fit_to_size(torch.zeros(1, 1, 40, 40), size=32, source="t")


def test_image_data_checks() -> None:
    with pytest.raises(ValueError, match="float32"):
        ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.float64), None, 0, "x")
    with pytest.raises(ValueError, match="labels"):
        ImageData(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64), 10, "x")


# ------------------------------------------------------------------------------------ BatchSampler

def toy(n: int = 10) -> ImageData:
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    images[:, :, :, 1] += 0.5  # left/right differ, so flips are visible
    return ImageData(images, torch.arange(n), 10, "toy")


def test_sampler_is_stateless_and_seeded() -> None:
    a = BatchSampler(toy(), batch_size=4, seed=1, random_flip=True)
    b = BatchSampler(toy(), batch_size=4, seed=1, random_flip=True)
    for step in (7, 0, 3, 7):  # any order, fresh instance: same batches (resume = uninterrupted)
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = BatchSampler(toy(), batch_size=4, seed=2, random_flip=True)
    assert not all(torch.equal(a.indices(s), c.indices(s)) for s in range(5))


def test_sampler_covers_each_epoch_once() -> None:
    sampler = BatchSampler(toy(12), batch_size=4, seed=0)
    epoch0 = torch.cat([sampler.indices(s) for s in range(3)])
    epoch1 = torch.cat([sampler.indices(s) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(12)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)  # a new permutation per epoch


def test_sampler_straddles_epochs_and_handles_large_batches() -> None:
    sampler = BatchSampler(toy(10), batch_size=4, seed=0)
    stream = torch.cat([sampler.indices(s) for s in range(5)])  # 20 = exactly two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) == sorted(stream[10:].tolist())
    big = BatchSampler(toy(3), batch_size=7, seed=0)
    x, y = big.batch(2)
    assert x.shape == (7, 1, 2, 2) and y.shape == (7,)


def test_random_flip_is_deterministic_and_flips_about_half() -> None:
    data = toy(10)
    sampler = BatchSampler(data, batch_size=10, seed=3, random_flip=True)
    flipped = 0
    for step in range(20):
        x, y = sampler.batch(step)
        original = data.images[y]
        is_flipped = (x != original).flatten(1).any(dim=1)
        assert torch.equal(x[is_flipped], original[is_flipped].flip(-1))
        flipped += int(is_flipped.sum())
    assert 60 < flipped < 140
    plain = BatchSampler(data, batch_size=10, seed=3)
    x, y = plain.batch(0)
    assert torch.equal(x, data.images[y])


# ------------------------------------------------------------------------------------ the real thing

REAL = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.exists(os.path.join(REAL, "t10k-images-idx3-ubyte.gz")),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    test = load_split(DataConfig(name="fashion_mnist", image_size=32), split="test")  # default location
    assert test.images.shape == (10000, 1, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.images.min() == -1 and test.images.max() == 1
    assert D.read_idx(os.path.join(REAL, "train-labels-idx1-ubyte.gz"), kind="labels").shape == (60000,)
