"""load_split: one split of the configured dataset as float32 (N, C, S, S) in [-1, 1], S = data.image_size.

Dispatches on ``data.name`` to the format modules (``captions``: the images of an image-caption folder,
unlabelled; a text-to-image pipeline trains on their encoded latents instead), cuts the training split to ``data.limit``
examples, and fits every image to ``data.image_size``.
"""

from __future__ import annotations

import numpy as np
import torch

from pd_core.config import DataConfig
from pd_core.data.captions import load_captions
from pd_core.data.cifar import _load_cifar10
from pd_core.data.common import DatasetError, Split
from pd_core.data.dataset import ImageData
from pd_core.data.digits import _load_digits
from pd_core.data.folder import _folder_tensor, _load_folder
from pd_core.data.idx import _load_idx_dataset
from pd_core.data.locate import _source_name
from pd_core.data.npz import _load_npz
from pd_core.data.shaping import fit_to_size, to_unit_range


def load_split(cfg: DataConfig, *, split: Split) -> ImageData:
    """Load one split of the configured dataset as float32 (N, C, S, S) in [-1, 1], S = cfg.image_size.

    ``cfg.limit`` keeps the first N training examples (the test split is never cut: it is the
    evaluation reference).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    source = _source_name(cfg)
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
    elif cfg.name == "captions":  # the images only (RGB); a text-to-image teacher encodes them with their captions
        images, labels, num_classes = load_captions(cfg.url, size=cfg.image_size, split=split).images, None, 0
    else:  # DataConfig's Literal makes this unreachable; kept so a new name fails loudly
        raise DatasetError(f"unknown dataset {cfg.name!r}")
    if split == "train" and cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit] if labels is not None else None
    images = fit_to_size(images, size=cfg.image_size, source=source).contiguous()
    label_tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    return ImageData(images=images, labels=label_tensor, num_classes=num_classes, name=cfg.name)
