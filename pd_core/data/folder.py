"""Image folders: ``root[/train|/test]/<class>/<image>``, classes numbered in sorted folder order.

Images are decoded with Pillow (grayscale stays one channel unless any image is colour, then
all become RGB) and each is fitted to image_size on its own, as sizes may differ.
"""

from __future__ import annotations

import fsspec
import numpy as np
import torch
from torch import Tensor

from pd_core.config import DataConfig
from pd_core.data.common import DatasetError, Split
from pd_core.data.files import _local, join_url
from pd_core.data.shaping import fit_to_size, to_unit_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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

