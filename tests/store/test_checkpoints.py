"""Checkpoint round trips on every backend (path, file://, memory://, moto S3)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from pd_core.store import (
    CheckpointStore,
    StoreError,
)
from tests.store.helpers import (
    KEY,
    TEST_KEY_ID,
    TEST_SECRET,
    _assert_same,
    _folder,
    _make_store,
    _manifest,
    _model_name,
    _one_line,
    _raw_names,
    _weights,
)


def test_round_trip_on_every_backend(store: CheckpointStore) -> None:
    weights = _weights(1)
    ref = store.save_checkpoint(KEY, tensors=weights, manifest=_manifest(note="extra field", unet={"ch": 8}))

    assert ref.uri == store.uri(KEY) and ref.key == KEY
    assert re.fullmatch(r"(file|memory|s3)://.+/pipelines/demo/rounds/01-0004", ref.uri)
    tensors, manifest = store.load_checkpoint(KEY)
    _assert_same(tensors, weights)
    assert manifest == ref.manifest == store.read_manifest(KEY)
    assert manifest["kind"] == "student" and manifest["round"] == 1 and manifest["steps"] == 4
    assert manifest["parent_sha256"] == "ab" * 32 and manifest["config_hash"] == "cafe"
    assert manifest["note"] == "extra field" and manifest["unet"] == {"ch": 8}
    assert manifest["status"] == "complete" and manifest["format"] == "pd-checkpoint/1"
    created = datetime.fromisoformat(manifest["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo == timezone.utc and abs(time.time() - created.timestamp()) < 60
    entry = manifest["files"]["weights"]
    data = store.fs.cat_file(f"{_folder(store, KEY)}/{entry['path']}")
    assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert ref.sha256 == manifest["sha256"] == entry["sha256"]
    assert store.is_complete(KEY)
    assert store.load_checkpoint(KEY, expected_sha256=ref.sha256)[1]["sha256"] == ref.sha256
    assert store.list("pipelines/demo/rounds") == [KEY]
    assert _raw_names(store, KEY) == {"manifest.json", entry["path"]}


def test_resave_replaces_checkpoint_and_removes_old_file(store: CheckpointStore) -> None:
    first = store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    second = store.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest(round=2))
    assert first.sha256 != second.sha256
    tensors, manifest = store.load_checkpoint(KEY)
    _assert_same(tensors, _weights(2))
    assert manifest["round"] == 2
    assert _raw_names(store, KEY) == {"manifest.json", _model_name(store, KEY)}


def test_small_files_and_listing(store: CheckpointStore) -> None:
    assert store.list() == [] and not store.exists("eval/results.json")
    sha = store.put_bytes("eval/results.json", b'{"fd": 1.5}')
    assert sha == hashlib.sha256(b'{"fd": 1.5}').hexdigest()
    assert store.get_bytes("eval/results.json") == b'{"fd": 1.5}'
    store.put_bytes("eval/results.json", b"{}")  # atomic overwrite
    assert store.get_bytes("eval/results.json") == b"{}"
    assert store.exists("eval/results.json") and store.list("eval") == ["eval/results.json"]
    assert store.list() == ["eval"] and store.list("eval/results.json") == []
    assert not [n for n in _raw_names(store, "eval") if n.startswith(".tmp-")]
    with pytest.raises(StoreError, match="not found") as err:
        store.get_bytes("eval/missing.json")
    assert store.uri("eval/missing.json") in _one_line(err.value)


def test_missing_checkpoint(store: CheckpointStore) -> None:
    assert store.read_manifest(KEY) is None and not store.is_complete(KEY)
    with pytest.raises(StoreError, match="no checkpoint here") as err:
        store.load_checkpoint(KEY)
    assert store.uri(KEY) in _one_line(err.value)


def test_delete_checkpoint(local_store: CheckpointStore) -> None:
    local_store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    local_store.delete_checkpoint(KEY)
    assert not local_store.is_complete(KEY) and not local_store.exists(KEY)
    local_store.delete_checkpoint(KEY)  # idempotent


def test_shared_noncontiguous_and_empty_tensors_are_saved(local_store: CheckpointStore) -> None:
    base = torch.arange(12.0)
    tensors = {"a": base, "tied": base, "t": base.view(3, 4).t(), "half": base[6:], "empty": torch.zeros(0),
               "empty2": torch.zeros(0, 3)}
    local_store.save_checkpoint(KEY, tensors=tensors, manifest=_manifest())
    loaded, _ = local_store.load_checkpoint(KEY)
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name


def test_load_to_device_argument(local_store: CheckpointStore) -> None:
    local_store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    tensors, _ = local_store.load_checkpoint(KEY, device=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in tensors.values())


def test_unknown_protocol_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="storage.root"):
        CheckpointStore("nosuchproto://bucket/x")


@pytest.mark.parametrize("bad", ["../x", "/abs/path", "a//b", "s3://bucket/x", "a/./b", "a/../b", ".hidden",
                                 "a\\b", "a/b/", "a b"])
def test_bad_keys_refused(local_store: CheckpointStore, bad: str) -> None:
    with pytest.raises(ValueError, match="store key"):
        local_store.save_checkpoint(bad, tensors=_weights(1), manifest=_manifest())


@pytest.mark.parametrize("manifest, match", [
    ({"round": 1}, "kind"),
    ({"kind": "student", "status": "complete"}, "written by the store"),
    ({"kind": "student", "sha256": "x"}, "written by the store"),
    ({"kind": "student", "when": datetime.now()}, "JSON-serializable"),
    ({"kind": "student", "loss": float("nan")}, "JSON-serializable"),
])
def test_bad_manifests_refused_before_writing(local_store: CheckpointStore, manifest: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        local_store.save_checkpoint(KEY, tensors=_weights(1), manifest=manifest)
    assert not local_store.exists(KEY) or not _raw_names(local_store, KEY)


def test_expected_sha256_mismatch(local_store: CheckpointStore) -> None:
    local_store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    with pytest.raises(StoreError, match="not the expected"):
        local_store.load_checkpoint(KEY, expected_sha256="0" * 64)


def test_credentials_never_in_manifest_errors_or_logs(request: pytest.FixtureRequest, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    s3 = _make_store("s3", request, tmp_path)
    ref = s3.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    with pytest.raises(StoreError) as err:
        s3.load_checkpoint("pipelines/demo/rounds/99-0001")
    texts = [json.dumps(ref.manifest), s3.fs.cat_file(f"{_folder(s3, KEY)}/manifest.json").decode(), repr(s3),
             ref.uri, str(err.value), caplog.text]
    with s3.acquire_lease("pipelines/demo", owner="run-1", ttl_s=30):
        texts.append(s3.fs.cat_file(f"{_folder(s3, 'pipelines/demo')}/lease.json").decode())
    for text in texts:
        assert TEST_SECRET not in text and TEST_KEY_ID not in text
