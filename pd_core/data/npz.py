"""``.npz`` arrays: a file with per-split keys, or a directory with train.npz / test.npz.

Read with ``allow_pickle=False``. Images are uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with
C in {1, 3}; labels, when present, are N non-negative integers.
"""

from __future__ import annotations

import io

import numpy as np

from pd_core.config import DataConfig
from pd_core.data.common import DatasetError, Split
from pd_core.data.files import join_url, read_bytes, url_exists

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

