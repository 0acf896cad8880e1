"""A sweep point uses another pipeline's teacher where it is only when its lineage is this point's teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_core import jobs
from pd_core.config import load_config
from pd_core.lineage import PipelineMismatchError
from pd_core.store import CheckpointStore, StoreError


def _cfg(tmp_path: Path, name: str, *more: str):
    return load_config(preset="smoke", overrides=[f"pipeline.name={name}", f"storage.root={tmp_path / 'store'}",
                                                  "teacher.updates=4", "teacher.checkpoint_every=100",
                                                  "teacher.log_every=2", "eval.enabled=false", *more])


@pytest.mark.timeout(240)
def test_a_teacher_is_shared_only_with_points_of_its_lineage_and_never_copied(tmp_path: Path) -> None:
    leader = _cfg(tmp_path, "s.a")
    store = CheckpointStore(leader.storage.root)
    teacher = jobs.ensure_teacher(leader, store)
    key = jobs.teacher_key("s.a")

    same = _cfg(tmp_path, "s.b", "distill.lr=1e-3", "eval.num_samples=100")  # nothing that decides the teacher
    shared = jobs.shared_teacher(same, store, key=key)
    assert (shared.key, shared.sha256, shared.trained) == (teacher.key, teacher.sha256, False)
    assert not store.exists(f"{jobs.teacher_key('s.b')}/manifest.json")  # used where it is: no copy

    other = _cfg(tmp_path, "s.c", "teacher.lr=2e-3")
    with pytest.raises(PipelineMismatchError, match=r"teacher\.lr"):
        jobs.shared_teacher(other, store, key=key)
    with pytest.raises(PipelineMismatchError, match="pipeline.seed"):
        jobs.shared_teacher(_cfg(tmp_path, "s.d", "pipeline.seed=1"), store, key=key)
    with pytest.raises(StoreError, match="not complete"):
        jobs.shared_teacher(same, store, key=jobs.teacher_key("nobody"))
