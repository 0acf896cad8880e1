"""The official dataset files (URLs, pinned sha256) and their verified download, only when asked.

A file is written only if its sha256 equals the pinned value (the values tensorflow-datasets pins);
``data.mirror`` replaces the official host but not the checksums. The CIFAR-10 tarball is unpacked
by known member names only (no path from the archive is trusted).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass

from pd_core.data.common import DatasetError
from pd_core.data.files import join_url, read_bytes, url_exists, write_bytes_atomic


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
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}


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

