"""Train the offline feature classifier on Fashion-MNIST; measure its test accuracy and the
real-vs-real floor (FD, KID, precision/recall) in its feature space.

    python benchmarks/quality/classifier_floor.py [--epochs 4] [--seed 0] [--threads N]

Writes benchmarks/quality/classifier_floor.json; CLASSIFIER.md beside it reports the numbers.
Reads the IDX files directly (a local helper), so it needs nothing but pd_core.metrics.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pd_core import metrics


def read_idx(path: Path, offset: int) -> np.ndarray:
    """IDX payload after its header (16 bytes for images, 8 for labels)."""
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 1, 28, 28), int64 labels (N,))."""
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).with_name("classifier_floor.json")))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data)
    train_x, train_y = load_split(root, "train")
    test_x, test_y = load_split(root, "test")

    t0 = time.perf_counter()
    model, accuracy = metrics.train_feature_classifier(train_x, train_y, test_x, test_y, epochs=args.epochs,
                                                       seed=args.seed)
    train_s = time.perf_counter() - t0
    extractor = metrics.ClassifierFeatures(model, dataset="fashion_mnist")

    t0 = time.perf_counter()
    train_feats = metrics.extract_features(extractor, train_x[:10000])  # (10000, 128): first 10k train images
    test_feats = metrics.extract_features(extractor, test_x)  # (10000, 128): the whole test split
    features_s = time.perf_counter() - t0

    floors = {}
    for n in (10000, 1000):
        t0 = time.perf_counter()
        floors[str(n)] = metrics.real_floor(train_feats[:n], test_feats[:n], fd_name=extractor.fd_name,
                                            kid_name=extractor.kid_name, kid_subsets=100, kid_subset_size=1000)
        floors[str(n)]["seconds"] = round(time.perf_counter() - t0, 2)
    result = {"dataset": "fashion_mnist", "epochs": args.epochs, "seed": args.seed,
              "test_accuracy": accuracy, "train_seconds": round(train_s, 1),
              "feature_seconds_20k": round(features_s, 2), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "floor_train_vs_test": floors}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
