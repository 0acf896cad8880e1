"""Class-named captions for a labelled data set (with the empty captions guidance needs), written as an imagefolder
that load_captions reads back pixel for pixel, and prompt accuracy read from the prompts.
"""

from __future__ import annotations

import pytest
import torch

from pd_core.data.captions import load_captions
from pd_core.data.class_captions import (
    FASHION_MNIST_NAMES,
    class_captions,
    prompt_accuracy,
    prompt_classes,
    write_caption_folder,
)


def test_captions_name_the_class_and_exactly_a_tenth_are_empty_the_same_every_time():
    labels = torch.arange(40) % 10
    captions = class_captions(labels, names=FASHION_MNIST_NAMES, seed=3)
    assert captions == class_captions(labels, names=FASHION_MNIST_NAMES, seed=3)
    assert captions != class_captions(labels, names=FASHION_MNIST_NAMES, seed=4)
    assert sum(c == "" for c in captions) == 4
    kept = [(int(y), c) for y, c in zip(labels, captions, strict=True) if c]
    assert all(c == f"a photo of a {FASHION_MNIST_NAMES[y]}" for y, c in kept)
    assert class_captions(labels, names=FASHION_MNIST_NAMES, empty_fraction=0.0).count("") == 0
    with pytest.raises(ValueError, match="labels must lie in"):
        class_captions(torch.tensor([10]), names=FASHION_MNIST_NAMES)


def test_prompts_name_their_class_and_prompt_accuracy_counts_agreement():
    prompts = ["a photo of a sneaker", "a photo of a bag", "a photo of a ankle boot", "a photo of a sneaker"]
    labels = prompt_classes(prompts, names=FASHION_MNIST_NAMES)
    assert labels.tolist() == [7, 8, 9, 7]
    assert prompt_accuracy(torch.tensor([7, 0, 9, 1]), prompt_labels=labels) == 0.5
    with pytest.raises(ValueError, match="names no class"):
        prompt_classes(["a photo of a hat"], names=FASHION_MNIST_NAMES)
    with pytest.raises(ValueError, match="equal-length"):
        prompt_accuracy(torch.tensor([1, 2]), prompt_labels=labels)


def test_a_written_caption_folder_reads_back_pixel_for_pixel(tmp_path):
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    captions = class_captions(torch.arange(12) % 10, names=FASHION_MNIST_NAMES)
    write_caption_folder(gray, captions, str(tmp_path / "fmnist"))
    data = load_captions(str(tmp_path / "fmnist"), size=8)
    assert data.captions == tuple(captions)
    assert torch.equal(data.images, gray.float().div(127.5).sub(1).expand(12, 3, 8, 8))  # grayscale -> RGB
