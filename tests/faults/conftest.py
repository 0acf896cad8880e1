"""Fixtures shared by the jobs-level fault tests."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated project home for in-process ``pd`` calls: $PD_HOME, no PD_STORAGE / MLFLOW_TRACKING_URI /
    PD_DEBUG from the outside, the working folder a fresh one (so a write into ./.pd would show)."""
    home = tmp_path / "pd-home"
    monkeypatch.setenv("PD_HOME", str(home))
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    for name in ("PD_STORAGE", "MLFLOW_TRACKING_URI", "PD_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield home
