"""Disk full / permission denied while a round saves (local store, jobs level)."""

from __future__ import annotations

import errno
import posixpath
import re
from pathlib import Path
from typing import Any

import pytest

from pd_core import jobs
from pd_core.store import CheckpointStore, StorageIOError
from tests.faults.helpers import _assert_nothing_partial, _cfg, _copy_of, _names, _one_line, _round_key, _state_step


def _fail_writes(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, error: OSError, *, folder: str,
                 prefix: str) -> list[str]:
    """Make the local filesystem's open() for writing raise ``error`` for ``prefix`` files under ``folder``."""
    original = store.fs.open
    hits: list[str] = []

    def failing_open(path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        name = posixpath.basename(str(path))
        if any(m in mode for m in "wa") and str(path).startswith(folder) and re.match(rf"\.tmp-[0-9a-f]{{32}}-{prefix}",
                                                                                      name):
            hits.append(str(path))
            raise error
        return original(path, mode, *args, **kwargs)

    monkeypatch.setattr(store.fs, "open", failing_open)
    return hits


@pytest.mark.parametrize("error, prefix, hint", [
    (OSError(errno.ENOSPC, "No space left on device"), "model-", "disk is full"),  # the round's final save
    (PermissionError(errno.EACCES, "Permission denied"), "state-", "may not access it"),  # first in-round save
], ids=["disk-full-on-final-save", "permission-denied-on-state-save"])
def test_disk_full_or_permission_denied_during_a_round(template: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, error: OSError, prefix: str,
                                                        hint: str) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    before = {k: store.read_manifest(k) for k in (jobs.teacher_key("faults"), student.key)}
    key = _round_key(cfg, 2)
    folder = store._path(key)  # noqa: SLF001 - the round's folder and its .state sibling
    hits = _fail_writes(store, monkeypatch, error, folder=folder, prefix=prefix)
    with pytest.raises(StorageIOError, match=hint) as err:
        jobs.run_round(cfg, store, round_index=2, teacher=student)
    message = _one_line(err.value)
    assert err.value.__cause__ is error and len(hits) == 1, hits  # not retried: a full disk does not heal by itself
    assert store.uri(key) in message
    monkeypatch.undo()

    assert not store.is_complete(key) and store.read_manifest(key) is None
    for k in (key, jobs.state_key(key)):
        _assert_nothing_partial(store, k)
        assert not [n for n in _names(store, k) if n.startswith(".tmp-")], "temporary files left behind"
    for k, manifest in before.items():  # everything earlier is intact
        assert store.is_complete(k) and store.read_manifest(k) == manifest
    step = _state_step(store, key)
    # disk full at the end: the last in-round state (update 15) survives; denied at update 5: no state yet
    assert step == (15 if prefix == "model-" else None)
    again = jobs.run_round(cfg, store, round_index=2, teacher=student)  # space freed / permission fixed
    assert again.trained and again.resumed_from == (step or 0) and store.is_complete(key)
