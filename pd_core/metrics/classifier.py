"""The offline feature network: a small CNN trained by the project on the dataset's train split.

Its penultimate-layer features stand in for Inception's when the Inception weights are not
available (the practice for MNIST-like data). The metric it yields is named ``fd_<dataset>``,
never FID: the numbers are not comparable with published FIDs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from pd_core.images import from_uint8
from pd_core.metrics.features import ByteStore, sha256_hex

log = logging.getLogger(__name__)

MIN_SIZE = 8
Progress = Callable[[int, int], None]
LabelledSplits = tuple[Tensor, Tensor, Tensor, Tensor]  # train images, train labels, test images, test labels


def _conv(in_ch: int, out_ch: int, *, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU())


class FeatureClassifier(nn.Module):
    """conv 4x4/2 -> conv 3x3/2 -> conv 3x3 (each conv-BN-ReLU) -> adaptive avg pool 4x4
    -> Linear(feature_dim) -> BatchNorm1d (no affine) = features -> ReLU -> Linear(num_classes).

    Works for 1 or 3 channels and any H, W >= 8 (the adaptive pool fixes the head's input size).
    Strided convolutions instead of conv + max-pool: ~3x cheaper on a CPU, where this net is
    trained. Features are the penultimate layer before its ReLU, standardised per dimension with
    the training split's statistics (the BatchNorm1d running mean/var): dense, so their covariance
    is full rank, and of unit scale, so KID's kernel (x.y / d + 1)^3 stays well conditioned
    (unscaled features gave KID subset stds larger than the KID itself).
    """

    def __init__(self, *, in_channels: int, num_classes: int, feature_dim: int = 128, width: int = 32):
        super().__init__()
        self.arch = dict(in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim, width=width)
        self.body = nn.Sequential(
            _conv(in_channels, width, kernel=4, stride=2),  # (N, w, H/2, W/2)
            _conv(width, 2 * width, kernel=3, stride=2),  # (N, 2w, H/4, W/4)
            _conv(2 * width, 2 * width, kernel=3, stride=1),
            nn.AdaptiveAvgPool2d(4),  # (N, 2w, 4, 4)
        )
        self.embed = nn.Linear(2 * width * 16, feature_dim)
        self.standardize = nn.BatchNorm1d(feature_dim, affine=False)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Images float (N, C, H, W) in [-1, 1] -> features (N, feature_dim)."""
        return self.standardize(self.embed(self.body(x).flatten(1)))  # (N, 2w, 4, 4) -> (N, 32 w) -> (N, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))  # (N, num_classes) logits


class ClassifierFeatures:
    """Feature extractor over a trained :class:`FeatureClassifier`: uint8 images -> (N, D) features."""

    def __init__(self, model: FeatureClassifier, *, dataset: str, manifest: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        self.dataset = dataset
        self.manifest = manifest or {}
        self.fd_name = f"fd_{dataset}"
        self.kid_name = f"kid_{dataset}"

    @property
    def test_accuracy(self) -> float | None:
        return self.manifest.get("test_accuracy")

    @property
    def sha256(self) -> str | None:
        return self.manifest.get("sha256")

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """uint8 images (N, C, H, W) -> the classifier's labels (N,) int64 (what ``sample_accuracy`` scores)."""
        device = next(self.model.parameters()).device
        x = from_uint8(images.to(device))
        with torch.autocast(device_type=device.type, enabled=False):
            return self.model(x).argmax(1)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        x = from_uint8(images.to(device))  # (N, C, H, W) in [-1, 1]
        # fp32 features even inside a caller's autocast: metrics must not depend on the precision.
        with torch.autocast(device_type=device.type, enabled=False):
            return self.model.features(x).float()


def _check_split(name: str, images: Tensor, labels: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or min(images.shape[2:]) < MIN_SIZE:
        raise ValueError(f"{name} images must be (N, 1|3, H, W) with H, W >= {MIN_SIZE}; got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{name} labels must have shape ({images.shape[0]},); got {tuple(labels.shape)}")


def _as_float_images(images: Tensor) -> Tensor:
    return from_uint8(images) if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on images in [-1, 1] (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = _as_float_images(images[start:start + batch_size]).to(device)
        correct += int((model(x).argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / images.shape[0]


def train_feature_classifier(train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor, *,
                             num_classes: int | None = None, seed: int = 0, epochs: int = 4, batch_size: int = 128,
                             lr: float = 3e-3, feature_dim: int = 128, width: int = 32,
                             device: str | torch.device = "cpu",
                             progress: Progress | None = None) -> tuple[FeatureClassifier, float]:
    """Train the classifier (Adam, one-cycle LR, cross-entropy) and return it with its test accuracy.

    Deterministic for a seed on CPU: initialisation runs under a forked global RNG seeded with
    ``seed``, batches come from a ``torch.Generator(seed)``, and the model uses no dropout (the
    same thread count gives bit-identical weights).
    ``progress(step, total_steps)`` is called after every update.
    """
    _check_split("train", train_images, train_labels)
    _check_split("test", test_images, test_labels)
    n_cls = num_classes if num_classes is not None else int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(in_channels=train_images.shape[1], num_classes=n_cls, feature_dim=feature_dim,
                                  width=width)
    model.to(device)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-train_images.shape[0] // batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    t0, step = time.perf_counter(), 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(train_images.shape[0], generator=gen)
        for start in range(0, perm.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            if idx.numel() < 2:  # BatchNorm cannot normalise a batch of one; skip that last scrap
                continue
            x = _as_float_images(train_images[idx]).to(device)  # (B, C, H, W)
            loss = F.cross_entropy(model(x), train_labels[idx].long().to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress(step, total)
        log.info("feature classifier epoch %d/%d: last loss %.4f, %.1fs", epoch + 1, epochs, loss.item(),
                 time.perf_counter() - t0)
    accuracy = classifier_accuracy(model, test_images, test_labels)
    log.info("feature classifier test accuracy %.4f after %d epochs (%.1fs)", accuracy, epochs,
             time.perf_counter() - t0)
    return model.eval(), accuracy


def classifier_to_bytes(model: FeatureClassifier) -> bytes:
    """safetensors bytes of the weights (no pickle: loading never executes code)."""
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def classifier_from_bytes(data: bytes, *, arch: dict) -> FeatureClassifier:
    model = FeatureClassifier(**arch)
    model.load_state_dict(load_safetensors(data), strict=True)
    return model.eval()


def _classifier_keys(key: str) -> tuple[str, str]:
    return f"{key}/weights.safetensors", f"{key}/manifest.json"


def load_or_train_classifier(store: ByteStore, key: str, *, load_data: Callable[[], LabelledSplits], dataset: str,
                             seed: int = 0, epochs: int = 4, batch_size: int = 128, lr: float = 3e-3,
                             feature_dim: int = 128, device: str | torch.device = "cpu",
                             progress: Progress | None = None, num_classes: int | None = None) -> ClassifierFeatures:
    """The classifier cached under ``key`` in ``store``, trained (and cached) on a miss.

    ``load_data()`` returns (train_images, train_labels, test_images, test_labels) and is called
    only when training. The manifest (JSON, written after the weights) records dataset, seed,
    epochs, test accuracy, wall time and the weights' sha256, which is verified on load. A cached
    classifier trained with other settings is an error, not a silent reuse. ``num_classes``: the head's
    classes (default: one more than the largest label seen; give it when a class may have no example).
    """
    weights_key, manifest_key = _classifier_keys(key)
    wanted = {"dataset": dataset, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "feature_dim": feature_dim}
    if num_classes is not None:  # absent when not given: classifiers cached before keep their manifests' match
        wanted["num_classes"] = num_classes
    if store.exists(manifest_key):
        manifest = json.loads(store.get_bytes(manifest_key))
        differing = {k: (manifest.get(k), v) for k, v in wanted.items() if manifest.get(k) != v}
        if differing:
            raise ValueError(f"cached feature classifier at {key!r} was trained with other settings "
                             f"(cached, requested): {differing}; use another key or delete it")
        data = store.get_bytes(weights_key)
        if sha256_hex(data) != manifest["sha256"]:
            raise ValueError(f"feature classifier weights at {weights_key!r} do not match the manifest sha256")
        model = classifier_from_bytes(data, arch=manifest["arch"]).to(device)
        log.info("loaded feature classifier %s (test accuracy %.4f)", key, manifest["test_accuracy"])
        return ClassifierFeatures(model, dataset=dataset, manifest=manifest)
    train_x, train_y, test_x, test_y = load_data()
    t0 = time.perf_counter()
    model, accuracy = train_feature_classifier(train_x, train_y, test_x, test_y, seed=seed, epochs=epochs,
                                               batch_size=batch_size, lr=lr, feature_dim=feature_dim, device=device,
                                               progress=progress, num_classes=num_classes)
    data = classifier_to_bytes(model)
    manifest = {"kind": "feature_classifier", **wanted, "arch": model.arch, "test_accuracy": accuracy,
                "train_examples": int(train_x.shape[0]), "test_examples": int(test_x.shape[0]),
                "wall_seconds": round(time.perf_counter() - t0, 2), "sha256": sha256_hex(data)}
    store.put_bytes(weights_key, data)
    store.put_bytes(manifest_key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return ClassifierFeatures(model, dataset=dataset, manifest=manifest)
