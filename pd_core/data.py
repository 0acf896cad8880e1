"""Datasets through fsspec: IDX (Fashion-MNIST, MNIST), CIFAR-10 binary, .npz, image folders, digits.

Every location may be a local path or any fsspec URL (``file://``, ``memory://``, ``s3://``).
Nothing is unpickled: IDX and CIFAR binaries are parsed from bytes, ``.npz`` files are read with
``allow_pickle=False``. Downloads happen only when ``data.download`` is true, from the official
URLs (or ``data.mirror``), and are refused unless the sha256 matches the pinned value.

Images come out as float32 (N, C, H, W) in [-1, 1] (uint8 u -> u / 127.5 - 1), padded with -1
(black) or integer-downsampled to ``data.image_size``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pd_core.config import DataConfig

Split = Literal["train", "test"]

# Where Debian's dataset-fashion-mnist package puts the files.
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 R, 1024 G, 1024 B bytes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset could not be loaded; the one-line message names the file/URL and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class RemoteFile:
    """An official file: where it is published and the sha256 it must have."""

    name: str
    url: str
    sha256: str
    size: int


# sha256/size of the files as published (the same values tensorflow-datasets pins).
_FASHION_BASE = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
_MNIST_BASE = "https://storage.googleapis.com/cvdf-datasets/mnist/"
OFFICIAL_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion_mnist": (
        RemoteFile("train-images-idx3-ubyte.gz", _FASHION_BASE + "train-images-idx3-ubyte.gz",
                   "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
        RemoteFile("train-labels-idx1-ubyte.gz", _FASHION_BASE + "train-labels-idx1-ubyte.gz",
                   "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
        RemoteFile("t10k-images-idx3-ubyte.gz", _FASHION_BASE + "t10k-images-idx3-ubyte.gz",
                   "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
        RemoteFile("t10k-labels-idx1-ubyte.gz", _FASHION_BASE + "t10k-labels-idx1-ubyte.gz",
                   "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
    ),
    "mnist": (
        RemoteFile("train-images-idx3-ubyte.gz", _MNIST_BASE + "train-images-idx3-ubyte.gz",
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
        RemoteFile("train-labels-idx1-ubyte.gz", _MNIST_BASE + "train-labels-idx1-ubyte.gz",
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
        RemoteFile("t10k-images-idx3-ubyte.gz", _MNIST_BASE + "t10k-images-idx3-ubyte.gz",
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
        RemoteFile("t10k-labels-idx1-ubyte.gz", _MNIST_BASE + "t10k-labels-idx1-ubyte.gz",
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
    ),
    "cifar10": (
        RemoteFile("cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                   "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", 170052171),
    ),
}
_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
_PRETTY = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}


# --------------------------------------------------------------------------------------------
# The dataset value and the sampler
# --------------------------------------------------------------------------------------------

@dataclass
class ImageData:
    """A split in memory: images (N, C, H, W) float32 in [-1, 1], labels (N,) int64 or None."""

    images: Tensor
    labels: Tensor | None
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ValueError(f"images must be a float32 (N, C, H, W) tensor; got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels is not None and (self.labels.shape != (self.images.shape[0],)
                                        or self.labels.dtype != torch.int64):
            raise ValueError(f"labels must be int64 of shape ({self.images.shape[0]},); got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        """C."""
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """H (= W)."""
        return self.images.shape[2]

    def to(self, device: torch.device | str) -> ImageData:
        """A copy on ``device`` (put a small dataset on the GPU once instead of copying every batch)."""
        labels = self.labels.to(device) if self.labels is not None else None
        return ImageData(self.images.to(device), labels, self.num_classes, self.name)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (seed, epoch, ...), stable across processes and platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class BatchSampler:
    """Stateless batches: ``batch(step)`` depends only on (data, batch_size, seed, step).

    The training stream is the concatenation of per-epoch permutations, epoch e drawn from a
    generator seeded with (seed, e); batch k is positions [k B, (k+1) B) of that stream. A run
    resumed at step k therefore sees exactly the batches an uninterrupted run would, and a batch
    may straddle an epoch boundary (no example is dropped, B > N works).
    """

    def __init__(self, data: ImageData, *, batch_size: int, seed: int, random_flip: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if len(data) < 1:
            raise ValueError(f"dataset {data.name} is empty")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self._perm_cache: dict[int, Tensor] = {}  # a cache of pure functions of (seed, epoch), not state

    @property
    def steps_per_epoch(self) -> float:
        """Batches per pass over the data (fractional when B does not divide N)."""
        return len(self.data) / self.batch_size

    def permutation(self, epoch: int) -> Tensor:
        """The order of examples in ``epoch`` (int64, (N,))."""
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:  # only neighbouring epochs are ever needed together
                self._perm_cache.clear()
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm_cache[epoch] = torch.randperm(len(self.data), generator=gen)
        return self._perm_cache[epoch]

    def indices(self, step: int) -> Tensor:
        """Example indices of batch ``step`` (int64, (B,))."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        n = len(self.data)
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        for epoch in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
            parts.append(self.permutation(epoch)[lo:hi])
        return torch.cat(parts)  # (B,)

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        """(images (B, C, H, W), labels (B,) or None) of batch ``step``."""
        idx = self.indices(step).to(self.data.images.device)
        images = self.data.images[idx]  # (B, C, H, W)
        labels = self.data.labels[idx] if self.data.labels is not None else None
        if self.random_flip:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "flip", step))
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(images.device)  # (B,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels


# --------------------------------------------------------------------------------------------
# Bytes through fsspec
# --------------------------------------------------------------------------------------------

def _local(url: str) -> str:
    return url if "://" in url else os.path.expanduser(url)


def join_url(base: str, *names: str) -> str:
    """base/name/... for local paths and fsspec URLs alike."""
    return "/".join([base.rstrip("/"), *names]) if base else "/".join(names)


def url_exists(url: str) -> bool:
    """Whether ``url`` names an existing file or directory (False when the filesystem cannot tell)."""
    try:
        fs, path = fsspec.core.url_to_fs(_local(url))
        return bool(fs.exists(path))
    except (OSError, ValueError, ImportError):
        return False


def read_bytes(url: str) -> bytes:
    """All bytes of a local path or fsspec URL; DatasetError naming it when it cannot be read."""
    try:
        with fsspec.open(_local(url), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"{url} does not exist") from None
    except (OSError, ValueError, ImportError) as exc:
        raise DatasetError(f"{url} could not be read: {exc}") from None


def _maybe_gunzip(raw: bytes, *, source: str) -> bytes:
    """Decompress gzip data (recognised by its magic bytes, not the file name)."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"{source} is a truncated or corrupt gzip file ({exc}); delete it and get it "
                           "again") from None


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then move it into place: no half-written file is visible."""
    fs, path = fsspec.core.url_to_fs(_local(url))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


# --------------------------------------------------------------------------------------------
# Downloads (only when asked; sha256 pinned)
# --------------------------------------------------------------------------------------------

def _fetch(source: str) -> bytes:
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:  # noqa: S310 - fixed official URLs
                return response.read()
        except OSError as exc:
            raise DatasetError(f"download of {source} failed ({exc}); check the network or fetch the file by "
                               "hand into data.url") from None
    return read_bytes(source)


def fetch_verified(source: str, dest: str, *, sha256: str) -> None:
    """Copy ``source`` (https URL, path or fsspec URL) to ``dest`` only if its sha256 is ``sha256``.

    A mismatch writes nothing and raises DatasetError naming the source and both digests.
    """
    data = _fetch(source)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.lower():
        raise DatasetError(f"{source} has sha256 {digest}, expected {sha256.lower()}: refusing it and writing "
                           f"nothing to {dest} (corrupt download or wrong mirror); try again or fetch the file "
                           "by hand")
    write_bytes_atomic(dest, data)


def download_official(name: str, dest_dir: str, *, mirror: str | None = None) -> None:
    """Fetch the official files of ``name`` into ``dest_dir`` (verified), skipping files already there."""
    if name not in OFFICIAL_FILES:
        raise DatasetError(f"dataset {name!r} has no official download; give data.url instead")
    for remote in OFFICIAL_FILES[name]:
        dest = join_url(dest_dir, remote.name)
        if url_exists(dest):
            continue
        source = join_url(mirror, remote.name) if mirror else remote.url
        fetch_verified(source, dest, sha256=remote.sha256)
    if name == "cifar10":
        _extract_cifar(join_url(dest_dir, "cifar-10-binary.tar.gz"), dest_dir)


def _extract_cifar(tar_url: str, dest_dir: str) -> None:
    """Write the six .bin members of the CIFAR-10 tarball to dest_dir/cifar-10-batches-bin/."""
    wanted = [*_CIFAR_FILES["train"], *_CIFAR_FILES["test"]]
    if all(url_exists(join_url(dest_dir, "cifar-10-batches-bin", f)) for f in wanted):
        return
    try:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(tar_url)), mode="r:gz") as tar:
            for fname in wanted:  # only known member names: no path traversal from the archive
                member = tar.extractfile(f"cifar-10-batches-bin/{fname}")
                if member is None:
                    raise KeyError(fname)
                write_bytes_atomic(join_url(dest_dir, "cifar-10-batches-bin", fname), member.read())
    except (tarfile.TarError, KeyError, EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"{tar_url} is not the CIFAR-10 binary tarball ({exc}); delete it and download "
                           "again") from None


# --------------------------------------------------------------------------------------------
# Shaping: uint8 -> [-1, 1], pad / downsample to image_size
# --------------------------------------------------------------------------------------------

def to_unit_range(images: np.ndarray) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]: u / 127.5 - 1 (0 -> -1, 255 -> 1)."""
    return torch.tensor(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)  # copies: source may be read-only


def fit_to_size(images: Tensor, *, size: int, source: str) -> Tensor:
    """Pad (centred, value -1 = black) or integer-factor average-pool (N, C, H, W) images to size x size.

    Anything else (e.g. 40x40 into 32, non-square after downsampling) raises DatasetError.
    """
    _, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        # pad order for F.pad: (left, right, top, bottom)
        return F.pad(images, (left, size - w - left, top, size - h - top), value=-1.0)  # (N, C, size, size)
    if h == w and h % size == 0:
        return F.avg_pool2d(images, kernel_size=h // size)  # (N, C, size, size)
    raise DatasetError(f"{source}: images are {h}x{w} and cannot be made {size}x{size} (only padding smaller "
                       f"images and integer downsampling of square ones are done); set data.image_size to "
                       f"{max(h, w)} or resize the images")


# --------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST, MNIST)
# --------------------------------------------------------------------------------------------

def parse_idx(raw: bytes, *, kind: Literal["images", "labels"], source: str) -> np.ndarray:
    """An IDX file's bytes (optionally gzipped) -> uint8 (N, H, W) images or (N,) labels.

    Checks the magic number (2051 images, 2049 labels), the dimensions and that the file length
    is exactly header + N * H * W (or N) bytes.
    """
    raw = _maybe_gunzip(raw, source=source)
    expected = IDX_IMAGES_MAGIC if kind == "images" else IDX_LABELS_MAGIC
    if len(raw) < 4:
        raise DatasetError(f"{source} is truncated ({len(raw)} bytes, not even an IDX header); get the file again")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        other = {IDX_IMAGES_MAGIC: "an IDX images file", IDX_LABELS_MAGIC: "an IDX labels file"}.get(magic)
        what = f"; it looks like {other}" if other else ""
        raise DatasetError(f"{source} has magic number {magic}, expected {expected} for IDX {kind}{what}; "
                           "is data.url pointing at the right files?")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{source} is truncated inside its header; get the file again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims[0] < 1 or any(d < 1 for d in dims):
        raise DatasetError(f"{source} declares dimensions {dims}; expected at least one non-empty example")
    body = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header + body:
        state = "truncated" if len(raw) < header + body else "longer than its header says"
        raise DatasetError(f"{source} is {state}: header says {'x'.join(map(str, dims))} "
                           f"({header + body} bytes) but it has {len(raw)}; get the file again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(url: str, *, kind: Literal["images", "labels"]) -> np.ndarray:
    """Read and check one IDX(.gz) file from a path or fsspec URL."""
    return parse_idx(read_bytes(url), kind=kind, source=url)


def _find_idx(root: str, stem: str) -> str | None:
    for candidate in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):  # .gz, raw, LeCun's original names
        url = join_url(root, candidate)
        if url_exists(url):
            return url
    return None


def _missing_message(cfg: DataConfig, root: str, wanted: str) -> str:
    pretty = _PRETTY.get(cfg.name, cfg.name)
    ways = []
    if cfg.name == "fashion_mnist" and cfg.url is None:
        ways.append("install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
                    f"{FASHION_MNIST_DEFAULT_DIR})")
    ways.append(f"set data.url to a directory or fsspec URL that holds {wanted}")
    if cfg.name in OFFICIAL_FILES:
        ways.append(f"set data.download=true to fetch the official files (sha256-checked) into "
                    f"{_download_target(cfg)}")
    return f"{pretty} not found: {join_url(root, wanted)} does not exist; " + ", or ".join(ways)


def _download_target(cfg: DataConfig) -> str:
    return cfg.url if cfg.url is not None else join_url(cfg.download_dir, cfg.name)


def _roots(cfg: DataConfig) -> list[str]:
    """Where to look, in order: data.url, else the default location, then the download directory."""
    if cfg.url is not None:
        return [cfg.url]
    defaults = [FASHION_MNIST_DEFAULT_DIR] if cfg.name == "fashion_mnist" else []
    return [*defaults, join_url(cfg.download_dir, cfg.name)]


def _locate(cfg: DataConfig, names: Sequence[str],
            finder: Callable[[str, str], str | None]) -> tuple[str, list[str]]:
    """(root, urls) of the first root holding all ``names``; download when allowed; else DatasetError."""
    for root in _roots(cfg):
        found = [finder(root, n) for n in names]
        if all(found):
            return root, found  # type: ignore[return-value]
    if cfg.download:
        target = _download_target(cfg)
        download_official(cfg.name, target, mirror=cfg.mirror)
        found = [finder(target, n) for n in names]
        if all(found):
                return target, found  # type: ignore[return-value]
    root = _roots(cfg)[0]
    wanted = next(n for n in names if not finder(root, n))
    raise DatasetError(_missing_message(cfg, root, wanted if "." in wanted else f"{wanted}.gz"))


def _load_idx_dataset(cfg: DataConfig, split: Split) -> tuple[np.ndarray, np.ndarray]:
    _, (images_url, labels_url) = _locate(cfg, _IDX_STEMS[split], _find_idx)
    images = read_idx(images_url, kind="images")  # (N, H, W)
    labels = read_idx(labels_url, kind="labels")  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{images_url} has {images.shape[0]} images but {labels_url} has {labels.shape[0]} "
                           "labels; the files belong to different splits or one is damaged")
    if labels.max() > 9:
        raise DatasetError(f"{labels_url} has label {int(labels.max())}; {cfg.name} labels are 0..9")
    return images[:, None], labels  # (N, 1, H, W), (N,)


# --------------------------------------------------------------------------------------------
# CIFAR-10 binary version
# --------------------------------------------------------------------------------------------

def parse_cifar_binary(raw: bytes, *, source: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records (1 label byte + 3072 CHW bytes) -> uint8 (N, 3, 32, 32), labels (N,)."""
    if not raw or len(raw) % CIFAR_RECORD:
        raise DatasetError(f"{source} has {len(raw)} bytes, not a whole number of {CIFAR_RECORD}-byte CIFAR-10 "
                           "records; it is truncated or not the binary version (the python/pickle version is "
                           "not read)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)  # (N, 3073)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DatasetError(f"{source} has label {int(labels.max())}; CIFAR-10 labels are 0..9 (is it CIFAR-100?)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _find_cifar(root: str, name: str) -> str | None:
    for candidate in (join_url(root, name), join_url(root, "cifar-10-batches-bin", name)):
        if url_exists(candidate):
            return candidate
    return None


def _load_cifar10(cfg: DataConfig, split: Split) -> tuple[np.ndarray, np.ndarray]:
    _, urls = _locate(cfg, _CIFAR_FILES[split], _find_cifar)
    parts = [parse_cifar_binary(read_bytes(u), source=u) for u in urls]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --------------------------------------------------------------------------------------------
# .npz arrays
# --------------------------------------------------------------------------------------------

# (images, labels) key pairs of a split inside one .npz file (Keras' mnist.npz uses x_train/y_train)
_NPZ_SPLIT_KEYS = (("x_{split}", "y_{split}"), ("{split}_images", "{split}_labels"))


def _npz_arrays(url: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(read_bytes(url)), allow_pickle=False) as npz:  # never unpickle
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{url} is not a readable .npz of plain arrays ({exc})") from None


def _to_nchw(images: np.ndarray, *, source: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) uint8 with C in {1, 3} -> (N, C, H, W)."""
    if images.dtype != np.uint8:
        raise DatasetError(f"{source}: images must be uint8 (0..255), got {images.dtype}; convert with "
                           "np.round((x + 1) * 127.5).astype(np.uint8) or similar")
    if images.ndim == 3:
        return images[:, None]  # (N, 1, H, W)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images  # CHW already
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    raise DatasetError(f"{source}: images have shape {images.shape}; expected (N, H, W), (N, H, W, C) or "
                       "(N, C, H, W) with C = 1 or 3")


def _load_npz(cfg: DataConfig, split: Split) -> tuple[np.ndarray, np.ndarray | None]:
    """``url`` is a .npz file (keys x_<split>/y_<split> or <split>_images/<split>_labels, or images/labels
    and x/y meaning the training split) or a directory holding <split>.npz with images/labels or x/y."""
    url = cfg.url or ""
    if url.endswith(".npz"):
        arrays = _npz_arrays(url)
        pairs = [(a.format(split=split), b.format(split=split)) for a, b in _NPZ_SPLIT_KEYS]
        if split == "train":
            pairs += [("images", "labels"), ("x", "y")]
        source = url
    else:
        source = join_url(url, f"{split}.npz")
        if not url_exists(source):
            raise DatasetError(f"{source} does not exist; data.url for npz must be a .npz file or a directory "
                               "with train.npz and test.npz")
        arrays = _npz_arrays(source)
        pairs = [("images", "labels"), ("x", "y")]
    for images_key, labels_key in pairs:
        if images_key in arrays:
            images = _to_nchw(arrays[images_key], source=f"{source}[{images_key}]")
            labels = arrays.get(labels_key)
            if labels is not None:
                if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype,
                                                                                              np.integer):
                    raise DatasetError(f"{source}[{labels_key}] must be {images.shape[0]} integer labels, got "
                                       f"{labels.dtype} {labels.shape}")
                if labels.min() < 0:
                    raise DatasetError(f"{source}[{labels_key}] has negative label {int(labels.min())}")
            return images, labels
    keys = " or ".join(f"{a}/{b}" for a, b in pairs)
    raise DatasetError(f"{source} has arrays {sorted(arrays)} but none of {keys} for the {split} split")


# --------------------------------------------------------------------------------------------
# Image folders (root[/train|/test]/<class>/<image>)
# --------------------------------------------------------------------------------------------

def _subdirs(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e["name"].rstrip("/") for e in entries if e.get("type") == "directory")


def _load_folder(cfg: DataConfig, split: Split) -> tuple[list[np.ndarray], np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    root = cfg.url or ""
    fs, path = fsspec.core.url_to_fs(_local(root))
    top = {d.rsplit("/", 1)[-1]: d for d in _subdirs(fs, path)}
    if "train" in top:  # split folders; class folders inside each
        if split not in top:
            raise DatasetError(f"{join_url(root, split)} does not exist; add a {split}/ folder with class "
                               "subfolders, or set eval.enabled=false when there is no test split")
        base = top[split]
    elif split == "train":
        base = path
    else:
        raise DatasetError(f"{root} has class folders but no train/ and test/ split folders; evaluation needs "
                           f"{join_url(root, 'test')}/<class>/..., or set eval.enabled=false")
    classes = _subdirs(fs, base)
    if not classes:
        raise DatasetError(f"{join_url(root, split) if base != path else root} has no class subfolders; expected "
                           "<class>/<image>.png (one folder per class)")
    arrays, labels = [], []
    for label, class_dir in enumerate(classes):
        files = sorted(f for f in fs.ls(class_dir, detail=False) if f.lower().endswith(IMAGE_SUFFIXES))
        for file in files:
            try:
                with fs.open(file, "rb") as f, Image.open(f) as img:
                    img.load()
                    gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
                    arrays.append(np.asarray(img.convert("L" if gray else "RGB")))
            except (UnidentifiedImageError, OSError) as exc:
                raise DatasetError(f"{file} is not a readable image ({exc}); remove it from the folder") from None
            labels.append(label)
    if not arrays:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root} for the {split} split")
    return arrays, np.asarray(labels, dtype=np.int64), root


def _folder_tensor(arrays: list[np.ndarray], *, size: int, source: str) -> Tensor:
    """Per-image fit (sizes may differ); grayscale images are replicated to RGB if any image is colour."""
    colour = any(a.ndim == 3 for a in arrays)
    out = []
    for a in arrays:
        chw = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]  # (C, H, W)
        if colour and chw.shape[0] == 1:
            chw = np.repeat(chw, 3, axis=0)  # (3, H, W)
        out.append(fit_to_size(to_unit_range(chw[None]), size=size, source=source))  # (1, C, size, size)
    return torch.cat(out)  # (N, C, size, size)


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------

def _load_digits(split: Split) -> tuple[Tensor, np.ndarray]:
    """sklearn's 1797 8x8 digits (values 0..16 -> [-1, 1]); every 6th example is the test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    index = np.arange(len(digits.target))
    keep = index % 6 == 0 if split == "test" else index % 6 != 0
    images = digits.images[keep].astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    return torch.from_numpy(images / 8.0 - 1.0), digits.target[keep].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def load_split(cfg: DataConfig, *, split: Split) -> ImageData:
    """Load one split of the configured dataset as float32 (N, C, S, S) in [-1, 1], S = cfg.image_size.

    ``cfg.limit`` keeps the first N training examples (the test split is never cut: it is the
    evaluation reference).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    source = cfg.url or (FASHION_MNIST_DEFAULT_DIR if cfg.name == "fashion_mnist" else cfg.name)
    labels: np.ndarray | None
    if cfg.name in ("fashion_mnist", "mnist", "cifar10"):
        uint8, labels = _load_idx_dataset(cfg, split) if cfg.name != "cifar10" else _load_cifar10(cfg, split)
        images = to_unit_range(uint8)  # (N, C, H, W)
        num_classes = 10
    elif cfg.name == "npz":
        uint8, labels = _load_npz(cfg, split)
        images = to_unit_range(uint8)
        num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    elif cfg.name == "folder":
        arrays, labels, source = _load_folder(cfg, split)
        images = _folder_tensor(arrays, size=cfg.image_size, source=source)
        num_classes = int(labels.max()) + 1
    elif cfg.name == "digits":
        images, labels = _load_digits(split)
        num_classes = 10
    else:  # DataConfig's Literal makes this unreachable; kept so a new name fails loudly
        raise DatasetError(f"unknown dataset {cfg.name!r}")
    if split == "train" and cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit] if labels is not None else None
    images = fit_to_size(images, size=cfg.image_size, source=source).contiguous()
    label_tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    return ImageData(images=images, labels=label_tensor, num_classes=num_classes, name=cfg.name)


__all__ = [
    "BatchSampler", "DatasetError", "FASHION_MNIST_DEFAULT_DIR", "ImageData", "OFFICIAL_FILES", "RemoteFile",
    "derive_seed", "download_official", "fetch_verified", "fit_to_size", "join_url", "load_split",
    "parse_cifar_binary", "parse_idx", "read_bytes", "read_idx", "to_unit_range", "url_exists",
    "write_bytes_atomic",
]
