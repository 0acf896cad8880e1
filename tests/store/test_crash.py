"""Crash safety: a save that dies half-way leaves the previous checkpoint readable."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pd_core.store import (
    CheckpointStore,
    StoreError,
)
from tests.store.helpers import (
    KEY,
    PHASES,
    SimulatedCrash,
    _assert_no_partial_under_final_names,
    _assert_same,
    _folder,
    _inject,
    _make_store,
    _manifest,
    _model_name,
    _raw_names,
    _weights,
)


@pytest.mark.parametrize("backend", ["path", "memory", "s3"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("cleanup", [True, False], ids=["exception", "killed"])
def test_crash_mid_save_keeps_previous_checkpoint(backend: str, phase: str, cleanup: bool,
                                                  request: pytest.FixtureRequest, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = _make_store(backend, request, tmp_path)
    old = store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    if not cleanup:  # SIGKILL: no cleanup code runs, temp files stay behind
        monkeypatch.setattr(store, "_remove_quietly", lambda path: None)
    seen = _inject(phase, store, monkeypatch)

    expected = StoreError if phase == "data-verify" else SimulatedCrash
    with pytest.raises(expected):
        store.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest(round=2))
    assert len(seen) == 1, seen  # the fault fired once: verification failures are not retried
    monkeypatch.undo()

    tensors, manifest = store.load_checkpoint(KEY)
    _assert_same(tensors, _weights(1))
    assert manifest["sha256"] == old.sha256 and store.is_complete(KEY)
    _assert_no_partial_under_final_names(store, KEY)
    assert store.list(KEY) == [f"{KEY}/manifest.json", f"{KEY}/{_model_name(store, KEY)}"] or phase in (
        "manifest-write", "manifest-publish")  # then the complete new data file is there, unreferenced

    # The next save succeeds and cleans up what the crash left behind.
    new = store.save_checkpoint(KEY, tensors=_weights(3), manifest=_manifest(round=3))
    _assert_same(store.load_checkpoint(KEY)[0], _weights(3))
    assert _raw_names(store, KEY) == {"manifest.json", new.manifest["files"]["weights"]["path"]}


def test_stale_temp_file_from_killed_writer_is_ignored_and_removed(saved: CheckpointStore) -> None:
    folder = _folder(saved, KEY)
    stale = f".tmp-{uuid.uuid4().hex}-model-{'0' * 16}.safetensors"
    saved.fs.pipe_file(f"{folder}/{stale}", b"half a file")
    assert saved.is_complete(KEY) and KEY + "/" + stale not in saved.list(KEY)
    saved.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest())
    assert stale not in _raw_names(saved, KEY)
