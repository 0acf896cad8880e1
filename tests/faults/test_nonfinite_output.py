"""A student whose samples are not finite is never saved as complete; recovery is a rerun, not hand deletion.

The loss a round checks is the one before its last optimizer step: with a huge learning rate and one
update the weights blow up after the last check. The finite-output check (8 samples, fixed seed, at
the student's step count) catches that before anything is published.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from pd_core import jobs
from pd_core.models import load_model
from pd_core.store import CheckpointStore
from pd_core.train import NonFiniteLossError
from tests.faults.helpers import _cfg, _one_line, _round_key, log_lines


def test_a_student_that_samples_nan_is_not_saved_and_a_lower_lr_recovers(tmp_path: Path) -> None:
    diverging = _cfg("faults", "distill.lr=1e12", "distill.updates_per_round=1")
    store = CheckpointStore(str(tmp_path / "store"))
    teacher = jobs.ensure_teacher(diverging, store)
    key = _round_key(diverging, 1)
    with pytest.raises(NonFiniteLossError) as err:
        jobs.run_round(diverging, store, round_index=1, teacher=teacher)
    message = _one_line(err.value)
    assert re.match(r"round 1 \(8->4\): the student samples non-finite values \((\d+) of \1 values, 8 samples at "
                    r"4 step\(s\), seed 0\); nothing was saved as complete\. Lower distill\.lr .*--restart-from 1",
                    message), message
    assert store.read_manifest(key) is None and not store.is_complete(key)
    assert store.load_state(jobs.state_key(key)) is None  # one update: no in-round state either

    # The way out is a command: rerun with a lower learning rate. distill.lr decides the students only, so the
    # teacher is kept; the round trains again and its student samples finite values.
    fixed = _cfg("faults", "distill.updates_per_round=1")
    kept = jobs.ensure_teacher(fixed, store)
    assert not kept.trained and kept.sha256 == teacher.sha256
    student = jobs.run_round(fixed, store, round_index=1, teacher=kept)
    assert student.trained and store.is_complete(key)
    model = load_model(store, key)
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_hat, eps_hat = model.denoiser(z, torch.zeros(8))
    assert torch.isfinite(x_hat).all() and torch.isfinite(eps_hat).all()


def test_a_later_round_that_diverges_is_retrained_by_restart_from_keeping_the_earlier_ones(template: Path,
                                                                                          tmp_path: Path) -> None:
    import shutil

    shutil.copytree(template, tmp_path / "store")
    store = CheckpointStore(str(tmp_path / "store"))
    cfg = _cfg("faults")
    round1 = jobs.run_round(cfg, store, round_index=1, teacher=jobs.ensure_teacher(cfg, store))
    diverging = _cfg("faults", "distill.lr=1e12", "distill.updates_per_round=1", "pipeline.restart_from=2")
    with pytest.raises(NonFiniteLossError, match=r"^round 2 \(4->2\): the student samples non-finite values .*"
                                                 r"--restart-from 2"):
        jobs.run_round(diverging, store, round_index=2, teacher=round1)
    lower = _cfg("faults", "distill.lr=1e-4", "distill.updates_per_round=1", "pipeline.restart_from=2")
    kept = jobs.run_round(lower, store, round_index=1, teacher=jobs.ensure_teacher(lower, store))
    assert not kept.trained and kept.sha256 == round1.sha256
    again = jobs.run_round(lower, store, round_index=2, teacher=kept)
    assert again.trained and store.is_complete(again.key)


def test_a_teacher_with_a_huge_final_loss_gets_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg("huge", "teacher.updates=3", "teacher.log_every=1", "teacher.lr=100", "teacher.warmup_steps=0",
               "teacher.grad_clip=null")
    losses: list[float] = []
    caplog.set_level(logging.INFO, logger="pd_core")
    jobs.ensure_teacher(cfg, CheckpointStore(str(tmp_path / "store")), on_progress=lambda e: losses.append(e.loss))
    assert losses[-1] > 1e6, losses  # the setup diverges (finite, huge)
    lines = log_lines(caplog.records, "final loss", level=logging.WARNING)
    assert len(lines) == 1 and lines[0].startswith(f"teacher: final loss {losses[-1]:.3g} is huge"), lines
