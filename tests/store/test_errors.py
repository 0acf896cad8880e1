"""Storage errors: permission denied, disk full, an unreachable store; only transient errors are retried."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from pd_core.store import (
    CheckpointStore,
    StorageIOError,
    StoreError,
    is_transient_error,
    retry,
)
from tests.store.helpers import (
    KEY,
    TEST_SECRET,
    _assert_no_partial_under_final_names,
    _assert_same,
    _deny,
    _free_port,
    _manifest,
    _new_bucket,
    _one_line,
    _raw_names,
    _set_test_credentials,
    _start_moto,
    _weights,
)


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
