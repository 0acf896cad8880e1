"""Bad checkpoints and reruns at the jobs level (tampering itself is covered in tests/store/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pd_core import jobs
from pd_core.store import StoreError
from tests.faults.helpers import _cfg, _copy_of, _one_line, _round_key


def test_checkpoint_with_wrong_shapes_is_refused_clearly(template: Path, tmp_path: Path) -> None:
    import dataclasses

    from pd_core.models import load_model
    from pd_core.train import copy_weights
    from pd_core.unet import UNet, spec_from_dict

    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    manifest = store.read_manifest(student.key)
    wider = UNet(dataclasses.replace(spec_from_dict(manifest["unet"]), ch=24, emb_ch=96))  # not what the manifest says
    kept = {k: v for k, v in manifest.items() if k not in ("format", "sha256", "files", "status", "created_at")}
    ref = store.save_checkpoint(student.key, tensors=copy_weights(wider.state_dict()), manifest=kept)
    altered = dataclasses.replace(student, sha256=ref.sha256)
    attempts = {
        "load": lambda: load_model(store, student.key),
        "round": lambda: jobs.run_round(cfg, store, round_index=2, teacher=altered),
        "import": lambda: jobs.ensure_teacher(_cfg("other", f"pipeline.teacher_uri={student.uri}"), store),
    }
    for what, attempt in attempts.items():
        with pytest.raises(StoreError) as err:
            attempt()
        message = _one_line(err.value)
        assert re.search(r"weights do not fit the architecture in its manifest \(\S+ has shape \[", message), \
            (what, message)
        assert student.uri in message, (what, message)
    assert not store.exists(_round_key(cfg, 2)) and not store.exists(jobs.state_key(_round_key(cfg, 2)))
    assert not store.exists(jobs.teacher_key("other")), "a misfit teacher must not be imported"


def test_rerun_with_other_training_settings_is_refused(template: Path, tmp_path: Path) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    changed = _cfg("faults", "distill.lr=1e-3")
    teacher = jobs.ensure_teacher(changed, store)  # distill.lr decides the students, not the teacher
    assert not teacher.trained
    with pytest.raises(jobs.PipelineMismatchError) as err:
        jobs.run_round(changed, store, round_index=1, teacher=teacher)
    message = _one_line(err.value)
    assert student.uri in message and "distill.lr 0.0005 -> 0.001" in message, message
    assert "--restart-from 1" in message and "--name" in message, message
    with pytest.raises(jobs.PipelineMismatchError, match=r"teacher at .* other settings \(teacher\.lr"):
        jobs.ensure_teacher(_cfg("faults", "teacher.lr=1e-2"), store)
    assert store.read_manifest(student.key)["sha256"] == student.sha256
