"""Label dropout (the null class at its rate), guidance weights uniform on their range, class-balanced labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pd_core.guidance import (
    class_balanced_labels,
    drop_labels,
    sample_guidance,
)
from tests.guidance_reference import K


def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate():
    y = torch.arange(20000) % K
    out = drop_labels(y, p=0.2, null_label=K, generator=torch.Generator().manual_seed(0))
    dropped = out == K
    assert torch.equal(out[~dropped], y[~dropped])
    rate = dropped.double().mean().item()
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / 20000) ** 0.5, rate
    same = torch.rand(20000, generator=torch.Generator().manual_seed(0)) < 0.2
    assert torch.equal(dropped, same)  # one uniform per label from the generator
    assert torch.equal(drop_labels(y, p=0.0, null_label=K), y)
    with pytest.raises(ValueError, match="p must"):
        drop_labels(y, p=1.0, null_label=K)


def test_teacher_loss_with_label_dropout_trains_the_null_class():
    from pd_core.config import DiffusionConfig
    from pd_core.train.phases import teacher_loss_fn

    seen: list[torch.Tensor] = []

    class Recording(nn.Module):
        def forward(self, z, logsnr, y=None):
            seen.append(y.clone())
            return torch.zeros_like(z)

    fn = teacher_loss_fn(net=Recording(), diffusion_cfg=DiffusionConfig(), generator=torch.Generator().manual_seed(0),
                         label_dropout=0.5, null_label=K)
    y = torch.arange(400) % K
    fn(torch.zeros(400, 1, 2, 2), y)
    assert set(seen[0].tolist()) == {0, 1, 2, K} and 120 < int((seen[0] == K).sum()) < 280
    with pytest.raises(ValueError, match="null label"):
        teacher_loss_fn(net=Recording(), diffusion_cfg=DiffusionConfig(), generator=torch.Generator(),
                        label_dropout=0.1, null_label=None)


def test_guidance_weights_are_uniform_on_their_range():
    w = sample_guidance(40000, w_min=1.0, w_max=5.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(w.min()) >= 1.0 and float(w.max()) <= 5.0
    assert abs(float(w.mean()) - 3.0) < 4 * (16 / 12 / 40000) ** 0.5
    assert abs(float(w.var()) - 16 / 12) < 0.03
    assert torch.equal(sample_guidance(3, w_min=2.0, w_max=2.0), torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="w_min <= w_max"):
        sample_guidance(3, w_min=2.0, w_max=1.0)


def test_class_balanced_labels_cycle_through_the_classes_from_any_start():
    assert class_balanced_labels(start=0, count=7, num_classes=3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert class_balanced_labels(start=5, count=3, num_classes=3).tolist() == [2, 0, 1]
    full = class_balanced_labels(start=0, count=1000, num_classes=10)
    assert torch.bincount(full).tolist() == [100] * 10
