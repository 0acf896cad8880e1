"""IDX files (Fashion-MNIST, MNIST): strict parsing and the loader of a split.

An IDX file (optionally gzipped) is a big-endian header (magic 2051 for images, 2049 for labels;
then one uint32 per dimension) followed by exactly N * H * W (or N) unsigned bytes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pd_core.config import DataConfig
from pd_core.data.common import DatasetError, Split
from pd_core.data.files import _maybe_gunzip, join_url, read_bytes, url_exists
from pd_core.data.locate import _locate

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


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

