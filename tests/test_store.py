"""Checkpoint store: round trips on every backend, integrity checks, crash safety, leases, I/O errors.

The S3 tests run against moto's ThreadedMotoServer on 127.0.0.1 (no network); credentials are
fake values from the environment.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import io
import json
import os
import pickle
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

import pd_core.store as store_mod
from pd_core.store import (CheckpointStore, LeaseHeldError, LeaseLostError, StorageIOError, StoreError,
                           is_transient_error, optimizer_state_to_tensors, retry, tensors_to_optimizer_state)
from tests.conftest import set_fake_aws_env

TEST_KEY_ID = "AKIAPDSTORETESTKEY01"
TEST_SECRET = "pd-store-test-secret-never-logged"
KEY = "pipelines/demo/rounds/01-0004"


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_test_credentials(mp: pytest.MonkeyPatch, tmp_dir: Path) -> None:
    set_fake_aws_env(mp, tmp_dir, key_id=TEST_KEY_ID, secret=TEST_SECRET)


def _start_moto(port: int) -> Any:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1:<free port>; yields its endpoint URL."""
    with pytest.MonkeyPatch.context() as mp:
        _set_test_credentials(mp, tmp_path_factory.mktemp("aws"))
        port = _free_port()
        server = _start_moto(port)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


def _new_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"pd-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def _make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **kwargs: Any) -> CheckpointStore:
    """A fresh, empty store on the given backend."""
    kwargs = {"retry_base_delay": 0.01, "lease_settle_s": 0.01, **kwargs}
    if kind == "path":
        return CheckpointStore(str(tmp_path / "store"), **kwargs)
    if kind == "file":
        return CheckpointStore(f"file://{tmp_path}/store", **kwargs)
    if kind == "memory":
        return CheckpointStore(f"memory://pd-test-{uuid.uuid4().hex}", **kwargs)
    if kind == "s3":
        endpoint = request.getfixturevalue("moto_server")
        monkeypatch = request.getfixturevalue("monkeypatch")
        _set_test_credentials(monkeypatch, tmp_path)
        return CheckpointStore(f"s3://{_new_bucket(endpoint)}/store",
                               storage_options={"client_kwargs": {"endpoint_url": endpoint}}, **kwargs)
    raise AssertionError(kind)


@pytest.fixture(params=["path", "file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    return _make_store(request.param, request, tmp_path)


@pytest.fixture
def local_store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "store"), retry_base_delay=0.01)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "embed.index": torch.arange(5, dtype=torch.int64) * seed,
        "scale": torch.tensor(float(seed)),  # 0-d
    }


def _manifest(**extra: Any) -> dict[str, Any]:
    return {"kind": "student", "round": 1, "steps": 4, "parent_sha256": "ab" * 32, "config_hash": "cafe",
            **extra}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _folder(store: CheckpointStore, key: str) -> str:
    return store._path(key)  # noqa: SLF001 - tests look at the raw files


def _raw_names(store: CheckpointStore, key: str) -> set[str]:
    """Every file name in a checkpoint folder, temp files included."""
    folder = _folder(store, key)
    store.fs.invalidate_cache(folder)
    return {posixpath.basename(p.rstrip("/")) for p in store.fs.ls(folder, detail=False)}


def _model_name(store: CheckpointStore, key: str) -> str:
    return store.read_manifest(key)["files"]["weights"]["path"]


def _assert_no_partial_under_final_names(store: CheckpointStore, key: str) -> None:
    """Every non-temporary data file holds exactly the bytes its content-addressed name promises."""
    folder = _folder(store, key)
    for name in _raw_names(store, key):
        m = re.fullmatch(r"(model|state)-([0-9a-f]{16})\.safetensors", name)
        if m:
            data = store.fs.cat_file(f"{folder}/{name}")
            assert hashlib.sha256(data).hexdigest()[:16] == m.group(2), f"partial file under final name {name}"
        else:
            internal = {"manifest.json", "state.json", "lease.json", ".lease.lock"}
            assert name in internal or name.startswith(".tmp-"), name


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------
# Round trips


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


# ----------------------------------------------------------------------------------------------
# Integrity: corrupt, truncated, missing, escaping, pickled


@pytest.fixture
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    """A store (local or memory) holding one good checkpoint at KEY."""
    kind = getattr(request, "param", "path")
    s = _make_store(kind, request, tmp_path)
    s.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    return s


def _rewrite(store: CheckpointStore, key: str, name: str, edit: Callable[[bytes], bytes]) -> None:
    path = f"{_folder(store, key)}/{name}"
    store.fs.pipe_file(path, edit(store.fs.cat_file(path)))


@pytest.mark.parametrize("saved", ["path", "memory", "s3"], indirect=True)
@pytest.mark.parametrize("position", [9, -1])
def test_flipped_byte_is_detected(saved: CheckpointStore, position: int) -> None:
    def flip(data: bytes) -> bytes:
        b = bytearray(data)
        b[position] ^= 0x01
        return bytes(b)

    _rewrite(saved, KEY, _model_name(saved, KEY), flip)
    assert not saved.is_complete(KEY)
    with pytest.raises(StoreError, match="is corrupt") as err:
        saved.load_checkpoint(KEY)
    message = _one_line(err.value)
    assert saved.uri(KEY) in message and "sha256" in message and "rerun" in message


def test_truncated_file_is_detected(saved: CheckpointStore) -> None:
    _rewrite(saved, KEY, _model_name(saved, KEY), lambda data: data[:-7])
    assert not saved.is_complete(KEY)
    with pytest.raises(StoreError, match="truncated") as err:
        saved.load_checkpoint(KEY)
    assert saved.uri(KEY) in _one_line(err.value)


def test_missing_file_is_detected(saved: CheckpointStore) -> None:
    saved.fs.rm_file(f"{_folder(saved, KEY)}/{_model_name(saved, KEY)}")
    assert not saved.is_complete(KEY)
    with pytest.raises(StoreError, match="missing") as err:
        saved.load_checkpoint(KEY)
    assert saved.uri(KEY) in _one_line(err.value)


@pytest.mark.parametrize("edit, match", [
    (lambda m: {**m, "status": "writing"}, "not 'complete'"),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, "lists no 'weights' file"),
    (lambda m: {**m, "files": {"weights": {**m["files"]["weights"], "size": "12"}}}, "no valid sha256/size"),
])
def test_incomplete_or_malformed_manifest_refused(saved: CheckpointStore, edit: Callable, match: str) -> None:
    _rewrite(saved, KEY, "manifest.json", lambda data: json.dumps(edit(json.loads(data))).encode())
    assert not saved.is_complete(KEY)
    with pytest.raises(StoreError, match=match):
        saved.load_checkpoint(KEY)


def test_non_json_manifest_refused(saved: CheckpointStore) -> None:
    _rewrite(saved, KEY, "manifest.json", lambda data: data[: len(data) // 2])
    assert not saved.is_complete(KEY)
    with pytest.raises(StoreError, match="not valid JSON"):
        saved.load_checkpoint(KEY)


@pytest.mark.parametrize("path", ["../outside.safetensors", "/etc/passwd", "file:///etc/passwd",
                                  "s3://other-bucket/model.safetensors", "sub/../../outside.safetensors",
                                  "..\\outside.safetensors", "sub/model.safetensors", "~/model.safetensors",
                                  "manifest.json"])
def test_manifest_pointing_outside_is_refused(saved: CheckpointStore, path: str) -> None:
    # A real, hash-matching safetensors file outside the folder: only the path check can stop it.
    outside = safetensors_save({"x": torch.ones(2)})
    parent = posixpath.dirname(_folder(saved, KEY))
    saved.fs.pipe_file(f"{parent}/outside.safetensors", outside)
    entry = {"path": path, "sha256": hashlib.sha256(outside).hexdigest(), "size": len(outside)}
    _rewrite(saved, KEY, "manifest.json",
             lambda data: json.dumps({**json.loads(data), "files": {"weights": entry}}).encode())
    assert not saved.is_complete(KEY)
    with pytest.raises(StoreError, match="points outside the checkpoint folder") as err:
        saved.load_checkpoint(KEY)
    assert saved.uri(KEY) in _one_line(err.value)


class _Armed:
    """Unpickling this creates ``marker``: proof that something executed code from the file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"weight": _Armed(str(marker))})


def _torch_save_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": _Armed(str(marker))}, buf)
    return buf.getvalue()


def test_payloads_are_armed(tmp_path: Path) -> None:
    """Control: the payloads used below really execute code when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(_pickle_payload(marker))
    assert marker.exists()


@pytest.mark.parametrize("make_payload", [_pickle_payload, _torch_save_payload], ids=["pickle", "torch.save"])
def test_pickle_payload_refused_and_not_executed(saved: CheckpointStore, tmp_path: Path,
                                                 make_payload: Callable[[Path], bytes]) -> None:
    marker = tmp_path / "pwned"
    payload = make_payload(marker)
    sha = hashlib.sha256(payload).hexdigest()
    name = f"model-{sha[:16]}.safetensors"  # a forger can make the manifest match the payload
    saved.fs.pipe_file(f"{_folder(saved, KEY)}/{name}", payload)
    entry = {"path": name, "sha256": sha, "size": len(payload)}
    _rewrite(saved, KEY, "manifest.json",
             lambda data: json.dumps({**json.loads(data), "sha256": sha, "files": {"weights": entry}}).encode())
    assert not saved.is_complete(KEY)
    with pytest.raises(StoreError, match="is not a safetensors file") as err:
        saved.load_checkpoint(KEY)
    assert saved.uri(KEY) in _one_line(err.value) and "never unpickled" in str(err.value)
    assert not marker.exists()


def test_store_module_never_unpickles_nor_imports_orchestration() -> None:
    tree = ast.parse(Path(store_mod.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pickle", "dill", "cloudpickle", "joblib", "prefect", "mlflow"}
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not {c for c in calls if c.endswith(("torch.load", "pickle.load", "pickle.loads"))}


# ----------------------------------------------------------------------------------------------
# Crash safety: a save that dies half-way leaves the previous checkpoint readable


class SimulatedCrash(BaseException):
    """Raised from inside the write path; BaseException so no `except Exception` swallows it."""


def _crash_in(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, *, method: str,
              when: Callable[[str], bool], partial: bool = False, corrupt: bool = False) -> list[str]:
    """Make ``store.fs.<method>`` crash (or corrupt) for matching paths; returns the paths it saw."""
    original = getattr(store.fs, method)
    seen: list[str] = []

    def broken(path: str, *args: Any, **kwargs: Any) -> Any:
        target = args[0] if method in ("mv", "copy") else path
        if not when(str(target)):
            return original(path, *args, **kwargs)
        seen.append(str(target))
        if corrupt:
            return original(path, args[0][:-1] + bytes([args[0][-1] ^ 1]), *args[1:], **kwargs)
        if partial:
            original(path, args[0][: len(args[0]) // 2], *args[1:], **kwargs)
        raise SimulatedCrash(f"killed while {method} {target}")

    monkeypatch.setattr(store.fs, method, broken)
    return seen


def _is_tmp(kind: str) -> Callable[[str], bool]:
    return lambda path: posixpath.basename(path).startswith(".tmp-") and kind in posixpath.basename(path)


def _is_final(name_re: str) -> Callable[[str], bool]:
    return lambda path: re.fullmatch(name_re, posixpath.basename(path)) is not None


PHASES = ["data-write", "data-verify", "data-publish", "manifest-write", "manifest-publish"]


def _inject(phase: str, store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    local = store._local  # noqa: SLF001
    if phase == "data-write":
        return _crash_in(store, monkeypatch, method="pipe_file", when=_is_tmp("model-"), partial=True)
    if phase == "data-verify":  # storage silently returns other bytes than written
        return _crash_in(store, monkeypatch, method="pipe_file", when=_is_tmp("model-"), corrupt=True)
    if phase == "data-publish":
        return _crash_in(store, monkeypatch, method="mv" if local else "copy",
                         when=_is_final(r"model-[0-9a-f]{16}\.safetensors"))
    if phase == "manifest-write":
        if local:
            return _crash_in(store, monkeypatch, method="pipe_file", when=_is_tmp("manifest"), partial=True)
        # An object-store PUT is all-or-nothing: a crash means the new manifest never arrives.
        return _crash_in(store, monkeypatch, method="pipe_file", when=_is_final(r"manifest\.json"))
    if phase == "manifest-publish":
        if local:
            return _crash_in(store, monkeypatch, method="mv", when=_is_final(r"manifest\.json"))
        return _crash_in(store, monkeypatch, method="pipe_file", when=_is_final(r"manifest\.json"))
    raise AssertionError(phase)


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


# ----------------------------------------------------------------------------------------------
# Storage errors: permission denied, disk full, store unreachable


def _deny(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, error: OSError, *, modes: str) -> None:
    """Make the local filesystem's open() fail for the given modes ("w" for writes, "r" for reads)."""
    original = store.fs.open

    def failing_open(path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if any(m in mode for m in modes):
            raise error
        return original(path, mode, *args, **kwargs)

    monkeypatch.setattr(store.fs, "open", failing_open)


@pytest.mark.parametrize("error, match", [
    (PermissionError(errno.EACCES, "Permission denied"), "may not access it"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
    (OSError(errno.EROFS, "Read-only file system"), "may not access it"),
])
def test_write_errors_are_clear_and_leave_nothing_half_written(local_store: CheckpointStore, error: OSError,
                                                               match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    local_store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    before = _raw_names(local_store, KEY)
    _deny(local_store, monkeypatch, error, modes="wa")
    with pytest.raises(StorageIOError, match=match) as err:
        local_store.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest())
    message = _one_line(err.value)
    assert err.value.__cause__ is error and local_store.uri(KEY) in message
    monkeypatch.undo()
    assert _raw_names(local_store, KEY) == before
    _assert_same(local_store.load_checkpoint(KEY)[0], _weights(1))
    with pytest.raises(StorageIOError, match=match):
        _deny(local_store, monkeypatch, error, modes="wa")
        local_store.save_state(f"{KEY}.state", tensors=_weights(1), meta={"step": 1})


def test_read_permission_error_is_clear(saved: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    denied = PermissionError(errno.EACCES, "Permission denied")
    _deny(saved, monkeypatch, denied, modes="r")
    for call in (lambda: saved.load_checkpoint(KEY), lambda: saved.is_complete(KEY), lambda: saved.load_state(KEY)):
        with pytest.raises(StorageIOError, match="may not access it") as err:
            call()
        assert err.value.__cause__ is denied and saved.uri(KEY) in _one_line(err.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores chmod")
def test_read_only_directory_gives_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(StorageIOError, match="may not access it"):
            CheckpointStore(str(root)).save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    finally:
        root.chmod(0o700)


def test_unreachable_object_store_retries_then_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    _set_test_credentials(monkeypatch, tmp_path)
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    store = CheckpointStore("s3://bucket/store", retry_attempts=3, retry_base_delay=0.01,
                            storage_options={"client_kwargs": {"endpoint_url": endpoint},
                                             "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})
    started = time.monotonic()
    with pytest.raises(StorageIOError, match="unreachable") as err:
        store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    assert time.monotonic() - started < 30
    assert is_transient_error(err.value.__cause__)
    # dict.fromkeys: a record can reach caplog twice when Prefect's logging setup (an earlier in-process
    # flow run) also attached handlers to pd_core; each retry's message is distinct ("retry 1/2", "2/2").
    retries = list(dict.fromkeys(r.getMessage() for r in caplog.records if "transient storage error" in r.getMessage()))
    assert [m.rsplit(" in ", 1)[1] for m in retries] == ["0.01s", "0.02s"]  # 3 attempts, exponential backoff
    assert "s3://bucket/store/pipelines/demo/rounds/01-0004" in _one_line(err.value)
    assert TEST_SECRET not in str(err.value)


@pytest.mark.slow
def test_store_outage_mid_run_then_recovery(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Stop the object store between two saves: clear failure, old checkpoint intact, rerun works."""
    _set_test_credentials(monkeypatch, tmp_path)
    port = _free_port()
    server = _start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        bucket = _new_bucket(endpoint)
        store = CheckpointStore(f"s3://{bucket}/store", retry_attempts=2, retry_base_delay=0.01,
                                storage_options={"client_kwargs": {"endpoint_url": endpoint},
                                                 "config_kwargs": {"retries": {"max_attempts": 1}}})
        store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
        server.stop()
        with pytest.raises(StorageIOError, match="unreachable"):
            store.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest())
        with pytest.raises(StorageIOError, match="unreachable"):
            store.is_complete(KEY)  # an outage is an error, never "not complete, retrain"
        server = _start_moto(port)  # moto keeps its data in-process across restarts
        _assert_same(store.load_checkpoint(KEY)[0], _weights(1))
        _assert_no_partial_under_final_names(store, KEY)
        store.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest())
        _assert_same(store.load_checkpoint(KEY)[0], _weights(2))
    finally:
        server.stop()


def test_retry_backs_off_on_transient_errors_only() -> None:
    slept: list[float] = []
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retry(flaky, attempts=3, base_delay=0.1, sleep=slept.append) == "ok"
    assert slept == [0.1, 0.2]

    def always_down() -> None:
        raise TimeoutError("timed out")

    slept.clear()
    with pytest.raises(TimeoutError):
        retry(always_down, attempts=4, base_delay=0.5, max_delay=1.0, sleep=slept.append)
    assert slept == [0.5, 1.0, 1.0]

    for permanent in (StoreError("sha256 mismatch"), PermissionError(errno.EACCES, "denied"), FileNotFoundError("x"),
                      ValueError("bug")):
        slept.clear()

        def fail(err: BaseException = permanent) -> None:
            raise err

        with pytest.raises(type(permanent)):
            retry(fail, attempts=5, base_delay=0.1, sleep=slept.append)
        assert slept == []
    with pytest.raises(ValueError, match="attempts"):
        retry(lambda: None, attempts=0, base_delay=0.1)


# ----------------------------------------------------------------------------------------------
# In-round state and optimizer state without pickle


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, *, start: int, count: int) -> None:
    for step in range(start, start + count):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))  # (B, 4)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))


def _assert_state_equal(a: Any, b: Any, path: str = "") -> None:
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_state_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_continues_identically_after_state_round_trip(store: CheckpointStore, amsgrad: bool) -> None:
    model = _net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=amsgrad)
    _train_steps(model, opt, start=0, count=3)

    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"optim.{k}": v for k, v in opt_tensors.items()}, "rng.torch": torch.get_rng_state()}
    store.save_state(f"{KEY}.state", tensors=tensors, meta={"step": 3, "optimizer": opt_meta})
    expected_noise = torch.randn(5)

    loaded, meta = store.load_state(f"{KEY}.state")
    assert meta["step"] == 3
    resumed = _net(123)  # different init: everything must come from the saved state
    resumed.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=999.0)
    state_dict = tensors_to_optimizer_state({k[6:]: v for k, v in loaded.items() if k.startswith("optim.")},
                                            meta["optimizer"])
    _assert_state_equal(state_dict, opt.state_dict())
    resumed_opt.load_state_dict(state_dict)
    torch.set_rng_state(loaded["rng.torch"])
    assert torch.equal(torch.randn(5), expected_noise)

    _train_steps(model, opt, start=3, count=4)
    _train_steps(resumed, resumed_opt, start=3, count=4)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    _assert_state_equal(resumed_opt.state_dict(), opt.state_dict())


def test_state_lifecycle(store: CheckpointStore) -> None:
    key = f"{KEY}.state"
    assert store.load_state(key) is None
    store.save_state(key, tensors={"w": torch.ones(3)}, meta={"step": 1, "note": [1, 2]})
    store.save_state(key, tensors={"w": torch.full((3,), 2.0)}, meta={"step": 2})
    tensors, meta = store.load_state(key)
    assert meta == {"step": 2} and torch.equal(tensors["w"], torch.full((3,), 2.0))
    assert _raw_names(store, key) == {"state.json", json.loads(store.get_bytes(f"{key}/state.json"))["files"]
                                      ["tensors"]["path"]}
    store.clear_state(key)
    assert store.load_state(key) is None
    store.clear_state(key)  # idempotent


def test_state_and_checkpoint_can_share_a_key(local_store: CheckpointStore) -> None:
    local_store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    local_store.save_state(KEY, tensors={"w": torch.ones(2)}, meta={"step": 5})
    local_store.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest())  # must not remove the state
    assert local_store.load_state(KEY)[1] == {"step": 5}
    local_store.clear_state(KEY)
    _assert_same(local_store.load_checkpoint(KEY)[0], _weights(2))


def test_crash_mid_state_save_keeps_previous_state(local_store: CheckpointStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    key = f"{KEY}.state"
    local_store.save_state(key, tensors={"w": torch.ones(3)}, meta={"step": 10})
    _crash_in(local_store, monkeypatch, method="pipe_file", when=_is_tmp("state"), partial=True)
    with pytest.raises(SimulatedCrash):
        local_store.save_state(key, tensors={"w": torch.zeros(3)}, meta={"step": 20})
    monkeypatch.undo()
    tensors, meta = local_store.load_state(key)
    assert meta == {"step": 10} and torch.equal(tensors["w"], torch.ones(3))


def test_corrupt_state_is_refused(local_store: CheckpointStore) -> None:
    key = f"{KEY}.state"
    local_store.save_state(key, tensors={"w": torch.ones(3)}, meta={"step": 1})
    name = json.loads(local_store.get_bytes(f"{key}/state.json"))["files"]["tensors"]["path"]
    _rewrite(local_store, key, name, lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(StoreError, match="is corrupt"):
        local_store.load_state(key)


def test_optimizer_helpers_keep_types_and_refuse_unstorable_values() -> None:
    state = {"state": {0: {"step": torch.tensor(2.0), "buf": torch.ones(2)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "foreach": None, "__odd": 1}]}
    tensors, meta = optimizer_state_to_tensors(state)
    assert set(tensors) == {"state/0/step", "state/0/buf"}
    json.dumps(meta)  # JSON-able
    _assert_state_equal(tensors_to_optimizer_state(tensors, json.loads(json.dumps(meta))), state)
    with pytest.raises(TypeError, match="param_groups/0/fn"):
        optimizer_state_to_tensors({"param_groups": [{"fn": lambda: 0}]})
    with pytest.raises(ValueError, match="not among the given tensors"):
        tensors_to_optimizer_state({}, meta)
    with pytest.raises(ValueError, match="format"):
        tensors_to_optimizer_state(tensors, {"structure": {}})


# ----------------------------------------------------------------------------------------------
# Leases: never two writers on one key


@pytest.mark.parametrize("backend", ["path", "memory", "s3"])
def test_lease_conflict_release_and_same_owner(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    store = _make_store(backend, request, tmp_path)
    key = "pipelines/demo"
    with store.acquire_lease(key, owner="run-A", ttl_s=60) as lease:
        doc = json.loads(store.get_bytes(f"{key}/lease.json"))
        assert doc["owner"] == "run-A" and doc["pid"] == os.getpid() and doc["host"] == socket.gethostname()
        assert doc["expires_at"].endswith("Z")
        with pytest.raises(LeaseHeldError) as err:
            store.acquire_lease(key, owner="run-B", ttl_s=60)
        message = _one_line(err.value)
        assert "'run-A'" in message and doc["expires_at"] in message and store.uri(key) in message
        assert err.value.owner == "run-A" and err.value.expires_at == doc["expires_at"]
        again = store.acquire_lease(key, owner="run-A", ttl_s=60)  # a retried run with the same owner
        assert again.token != lease.token
        with pytest.raises(LeaseLostError):  # the re-acquisition superseded the old token
            lease.renew()
        again.release()
    with store.acquire_lease(key, owner="run-B", ttl_s=60):
        pass
    store.put_bytes(f"{key}/lease.json", b'{"owner": "someone", "expires_at_unix": "soon"}')
    with pytest.raises(StoreError, match="expires_at_unix"):
        store.acquire_lease(key, owner="run-C", ttl_s=60)
    store.fs.rm_file(f"{_folder(store, key)}/lease.json")
    with store.acquire_lease(key, owner="run-C", ttl_s=60):
        pass
    assert not store.exists(f"{key}/lease.json")


@pytest.mark.parametrize("backend", ["path", "memory"])
def test_expired_lease_is_taken_over(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    store = _make_store(backend, request, tmp_path)
    key = "pipelines/demo"
    old = store.acquire_lease(key, owner="crashed-run", ttl_s=0.2)
    time.sleep(0.3)
    new = store.acquire_lease(key, owner="run-B", ttl_s=60)
    with pytest.raises(LeaseLostError, match="crashed-run"):
        old.renew()
    old.release()  # must not remove run-B's lease
    with pytest.raises(LeaseHeldError, match="run-B"):
        store.acquire_lease(key, owner="run-C", ttl_s=60)
    new.release()


def test_renew_extends_the_lease(local_store: CheckpointStore) -> None:
    lease = local_store.acquire_lease("k", owner="A", ttl_s=0.3)
    lease.renew(ttl_s=60)
    time.sleep(0.4)
    with pytest.raises(LeaseHeldError):
        local_store.acquire_lease("k", owner="B", ttl_s=60)
    lease.release()
    lease.release()  # idempotent
    with pytest.raises(LeaseLostError, match="released"):
        lease.renew()


def test_only_one_of_many_concurrent_acquirers_wins(local_store: CheckpointStore) -> None:
    barrier = threading.Barrier(8)
    results: list[str] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            local_store.acquire_lease("pipelines/race", owner=f"run-{i}", ttl_s=60)
            results.append("won")
        except LeaseHeldError:
            results.append("refused")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["won"]


def test_lease_released_when_the_block_raises(local_store: CheckpointStore) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with local_store.acquire_lease("k", owner="A", ttl_s=60):
            raise RuntimeError("boom")
    local_store.acquire_lease("k", owner="B", ttl_s=60).release()


@pytest.mark.parametrize("owner, ttl, match", [("", 1.0, "owner"), ("A", 0.0, "ttl_s"), ("A", -1.0, "ttl_s")])
def test_lease_arguments_checked(local_store: CheckpointStore, owner: str, ttl: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        local_store.acquire_lease("k", owner=owner, ttl_s=ttl)
