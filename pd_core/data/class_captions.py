"""Captions that name a class, for a text-to-image model trained on a labelled data set, and prompt accuracy.

A label c of class names (n_0 .. n_{K-1}) becomes the caption ``template.format(n_c)`` ("a photo of a
sneaker"); exactly round(p N) of the N captions, chosen by a seeded permutation, are "" instead, so
the model also learns the unconditional eps(z, "") classifier-free guidance needs (p = 0.1 by
default). Prompt accuracy of samples made for prompts naming classes c_i is
    (1 / N) sum_i [classifier(x_i) == c_i],
the text-to-image counterpart of ``sample_accuracy``; :func:`prompt_classes` reads c_i back from the
prompts (a prompt naming no class is refused: its accuracy would mean nothing).
:func:`write_caption_folder` writes the pairs in Hugging Face's ``imagefolder`` convention.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor

from pd_core.data.captions import METADATA_NAME
from pd_core.data.common import DatasetError
from pd_core.data.files import join_url, write_bytes_atomic
from pd_core.images import png_bytes

TEMPLATE = "a photo of a {}"
FASHION_MNIST_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "ankle boot")


def class_captions(labels: Tensor, *, names: tuple[str, ...], empty_fraction: float = 0.1, seed: int = 0,
                   template: str = TEMPLATE) -> list[str]:
    """One caption per label (module docstring): the class's caption, or "" for round(p N) of them."""
    if not 0.0 <= empty_fraction < 1.0:
        raise ValueError(f"empty_fraction must lie in [0, 1); got {empty_fraction}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
        raise ValueError(f"labels must lie in [0, {len(names) - 1}]")
    captions = [template.format(names[c]) for c in labels.tolist()]
    empty = int(round(empty_fraction * len(captions)))
    for i in torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:empty].tolist():
        captions[i] = ""
    return captions


def prompt_classes(prompts: list[str], *, names: tuple[str, ...], template: str = TEMPLATE) -> Tensor:
    """The class each prompt names, (N,) int64; ValueError for a prompt that is no class's caption."""
    index = {template.format(n): c for c, n in enumerate(names)}
    missing = [p for p in prompts if p not in index]
    if missing:
        raise ValueError(f"prompt {missing[0]!r} names no class (prompts are {template!r} of a class name)")
    return torch.tensor([index[p] for p in prompts], dtype=torch.int64)


def prompt_accuracy(predicted: Tensor, *, prompt_labels: Tensor) -> float:
    """Fraction of samples the classifier puts in the class their prompt names."""
    if predicted.shape != prompt_labels.shape or predicted.ndim != 1 or not predicted.numel():
        raise ValueError(f"predicted and prompt_labels must be equal-length (N,) tensors; got "
                         f"{tuple(predicted.shape)} and {tuple(prompt_labels.shape)}")
    return float((predicted.long() == prompt_labels.long()).double().mean())


def write_caption_folder(images: Tensor, captions: list[str], url: str) -> str:
    """Write uint8 images (N, C, H, W) as ``<url>/images/<i>.png`` and ``metadata.jsonl`` (written last)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(captions):
        raise DatasetError(f"images must be uint8 (N, C, H, W) with one caption each; got {images.dtype} "
                           f"{tuple(images.shape)} and {len(captions)} captions")
    lines = []
    width = len(str(max(len(captions) - 1, 0)))
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        name = f"images/{i:0{width}d}.png"
        write_bytes_atomic(join_url(url, name), png_bytes(np.ascontiguousarray(image.permute(1, 2, 0).numpy())))
        lines.append(json.dumps({"file_name": name, "text": text}))
    write_bytes_atomic(join_url(url, METADATA_NAME), ("\n".join(lines) + "\n").encode("utf-8"))
    return url
