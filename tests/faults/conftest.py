"""Fixtures shared by the jobs-level fault tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_core import jobs
from pd_core.store import CheckpointStore
from tests.faults.helpers import _cfg


@pytest.fixture(scope="package")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store holding the teacher and round 1 of pipeline ``faults`` (copied by each test).

    Package scope: built once for all the files that use it, as when they were one module.
    """
    root = tmp_path_factory.mktemp("template") / "store"
    cfg = _cfg("faults")
    store = CheckpointStore(str(root))
    teacher = jobs.ensure_teacher(cfg, store)
    jobs.run_round(cfg, store, round_index=1, teacher=teacher)
    return root
