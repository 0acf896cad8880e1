"""Helpers of the store tests: backends, sample weights and manifests, raw-file checks."""

from __future__ import annotations

import hashlib
import io
import pickle
import posixpath
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pd_core.store import (
    CheckpointStore,
)
from tests.conftest import set_fake_aws_env

TEST_KEY_ID = "AKIAPDSTORETESTKEY01"


TEST_SECRET = "pd-store-test-secret-never-logged"


KEY = "pipelines/demo/rounds/01-0004"


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


def _rewrite(store: CheckpointStore, key: str, name: str, edit: Callable[[bytes], bytes]) -> None:
    path = f"{_folder(store, key)}/{name}"
    store.fs.pipe_file(path, edit(store.fs.cat_file(path)))


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


def _deny(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, error: OSError, *, modes: str) -> None:
    """Make the local filesystem's open() fail for the given modes ("w" for writes, "r" for reads)."""
    original = store.fs.open

    def failing_open(path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if any(m in mode for m in modes):
            raise error
        return original(path, mode, *args, **kwargs)

    monkeypatch.setattr(store.fs, "open", failing_open)


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
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_state_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path
