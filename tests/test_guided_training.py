"""Stage 1 of guided distillation learns: after a short run the student is much closer to the guided teacher
than the student it started as (the teacher's conditional model), at every w of the range."""

from __future__ import annotations

import pytest
import torch

from pd_core import jobs
from pd_core.config import load_config
from pd_core.data import load_split
from pd_core.guidance import GuidanceLoss
from pd_core.models import load_model
from pd_core.store import CheckpointStore

pytestmark = pytest.mark.slow


def _held_out_loss(student, teacher, *, x, y, w: float, null_label: int) -> float:
    """Mean stage-1 loss (pd_core.guidance) at a fixed w over one draw of (t, eps) per example."""
    loss = GuidanceLoss(teacher, null_label=null_label, w_min=w, w_max=w, weighting="snr_trunc")
    with torch.no_grad():
        return loss(student, x, y, generator=torch.Generator().manual_seed(3)).mean().item()


def test_a_short_stage_one_brings_the_student_close_to_the_guided_teacher_at_every_w(tmp_path):
    cfg = load_config(preset="smoke-guided", overrides=[
        f"storage.root={tmp_path / 'store'}", "eval.enabled=false", "runtime.threads=1",
        "guidance.updates=100", "guidance.log_every=50", "guidance.checkpoint_every=1000"])
    store = CheckpointStore(cfg.storage.root)
    teacher_info = jobs.ensure_teacher(cfg, store)
    guided_info = jobs.run_guide_distill(cfg, store, teacher=teacher_info)
    teacher, student = load_model(store, teacher_info.key), load_model(store, guided_info.key)
    start = teacher.denoiser  # the stage-1 student as built: the teacher's conditional model at every w
    data = load_split(cfg.data, split="test")
    x, y = data.images[:400], data.labels[:400]
    null = data.num_classes
    for w in (0.5 * cfg.guidance.w_max, cfg.guidance.w_max):
        before = _held_out_loss(start, teacher.denoiser, x=x, y=y, w=w, null_label=null)
        after = _held_out_loss(student.denoiser, teacher.denoiser, x=x, y=y, w=w, null_label=null)
        assert after < 0.5 * before, (w, before, after)
    at_zero = _held_out_loss(student.denoiser, teacher.denoiser, x=x, y=y, w=0.0, null_label=null)
    assert at_zero < 0.5 * _held_out_loss(start, teacher.denoiser, x=x, y=y, w=cfg.guidance.w_max, null_label=null)
