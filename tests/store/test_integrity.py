"""Integrity: corrupt, truncated, missing, escaping and pickled checkpoints are refused, never executed."""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import posixpath
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

import pd_core.store as store_mod
from pd_core.store import (
    CheckpointStore,
    StoreError,
)
from tests.store.helpers import KEY, _folder, _model_name, _one_line, _pickle_payload, _rewrite, _torch_save_payload


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


def test_payloads_are_armed(tmp_path: Path) -> None:
    """Control: the payloads used below really execute code when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(_pickle_payload(marker))  # noqa: S301 - the control: it must run the payload
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


@pytest.mark.parametrize("module", sorted(p.name for p in Path(store_mod.__file__).parent.glob("*.py")))
def test_store_module_never_unpickles_nor_imports_orchestration(module: str) -> None:
    tree = ast.parse((Path(store_mod.__file__).parent / module).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pickle", "dill", "cloudpickle", "joblib", "prefect", "mlflow"}
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not {c for c in calls if c.endswith(("torch.load", "pickle.load", "pickle.loads"))}
