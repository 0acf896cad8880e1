"""Datasets through fsspec: IDX (Fashion-MNIST, MNIST), CIFAR-10 binary, .npz, image folders, digits.

Every location may be a local path or any fsspec URL (``file://``, ``memory://``, ``s3://``).
Nothing is unpickled: IDX and CIFAR binaries are parsed from bytes, ``.npz`` files are read with
``allow_pickle=False``. Downloads happen only when ``data.download`` is true, from the official
URLs (or ``data.mirror``), and are refused unless the sha256 matches the pinned value.

Images come out as float32 (N, C, H, W) in [-1, 1] (uint8 u -> u / 127.5 - 1), padded with -1
(black) or integer-downsampled to ``data.image_size``.

Modules, lowest first: ``common`` (Split, DatasetError), ``dataset`` (ImageData, BatchSampler),
``files`` (bytes through fsspec), ``download`` (official files, verified), ``locate`` (where the
files are), ``shaping``, one module per format (``idx``, ``cifar``, ``npz``, ``folder``, ``digits``)
and ``load`` (:func:`load_split`).
"""

from pd_core.data.cifar import parse_cifar_binary
from pd_core.data.common import DatasetError
from pd_core.data.dataset import BatchSampler, ImageData, derive_seed
from pd_core.data.download import OFFICIAL_FILES, RemoteFile, download_official, fetch_verified
from pd_core.data.files import join_url, read_bytes, url_exists, write_bytes_atomic
from pd_core.data.idx import parse_idx, read_idx
from pd_core.data.load import load_split
from pd_core.data.locate import FASHION_MNIST_DEFAULT_DIR
from pd_core.data.shaping import fit_to_size, to_unit_range

__all__ = [
    "BatchSampler", "DatasetError", "FASHION_MNIST_DEFAULT_DIR", "ImageData", "OFFICIAL_FILES", "RemoteFile",
    "derive_seed", "download_official", "fetch_verified", "fit_to_size", "join_url", "load_split",
    "parse_cifar_binary", "parse_idx", "read_bytes", "read_idx", "to_unit_range", "url_exists",
    "write_bytes_atomic",
]
