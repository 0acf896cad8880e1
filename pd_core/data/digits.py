"""scikit-learn's 8x8 digits: 1797 images, values 0..16 mapped to [-1, 1] by v / 8 - 1.

Every 6th example (index % 6 == 0) is the test split, the rest the training split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pd_core.data.common import DatasetError, Split


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

