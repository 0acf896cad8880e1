"""An object store that stops answering (accepts connections, never replies) fails in bounded time, a log
line per retry; disk-full and permission errors are permanent: neither the store nor a task retries them."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pd_core.store import CheckpointStore, StorageIOError
from tests.store.helpers import _set_test_credentials


@pytest.fixture
def paused_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint that is paused, not refusing: the kernel accepts TCP connections, nothing ever answers."""
    _set_test_credentials(monkeypatch, tmp_path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # never accept()ed: requests are sent, no response ever comes
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_s3_requests_time_out_by_default_and_the_timeouts_can_be_set() -> None:
    from pd_core.store.objects import S3_CONFIG_DEFAULTS, with_s3_defaults

    assert S3_CONFIG_DEFAULTS["connect_timeout"] == 10 and S3_CONFIG_DEFAULTS["read_timeout"] == 30
    assert with_s3_defaults("s3://b/p", None)["config_kwargs"] == S3_CONFIG_DEFAULTS
    mine = with_s3_defaults("s3://b/p", {"config_kwargs": {"read_timeout": 5}, "anon": False})
    assert mine["config_kwargs"]["read_timeout"] == 5 and mine["config_kwargs"]["connect_timeout"] == 10
    assert mine["anon"] is False
    assert with_s3_defaults("/local/store", {"x": 1}) == {"x": 1}
    assert "config_kwargs" not in with_s3_defaults("memory://store", None)


def test_a_paused_object_store_fails_in_bounded_time_with_a_line_per_retry(paused_endpoint: str,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    options = {"client_kwargs": {"endpoint_url": paused_endpoint},
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 1}}
    store = CheckpointStore("s3://pd-paused/store", storage_options=options, retry_base_delay=0.05)
    caplog.set_level(logging.WARNING, logger="pd_core.store")
    t0 = time.monotonic()
    with pytest.raises(StorageIOError) as err:
        store.put_bytes("pipelines/x/report/quality.csv", b"steps\n1\n")
    seconds = time.monotonic() - t0
    from pd_core.store import TransientStorageIOError

    assert isinstance(err.value, TransientStorageIOError) and err.value.transient
    assert "s3://pd-paused/store/pipelines/x/report" in str(err.value)
    assert "unreachable" in str(err.value), str(err.value)
    # (de-duplicated: with Prefect's logging set up by earlier tests, a record can reach caplog twice)
    retries = list(dict.fromkeys(r.getMessage() for r in caplog.records if "transient storage error" in r.getMessage()))
    assert len(retries) == 2 and all("retry" in m and "s3://pd-paused/store" in m for m in retries), retries
    assert seconds < 15, f"3 attempts with 1 s timeouts took {seconds:.1f}s: hidden retries multiply the timeout"


@pytest.mark.parametrize("error, transient", [
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (OSError(errno.EROFS, "Read-only file system"), False),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
    (TimeoutError("timed out"), True),
])
def test_only_transient_storage_errors_are_retried_by_a_task(tmp_path: Path, error: OSError,
                                                             transient: bool) -> None:
    from pd_core.store import TransientStorageIOError
    from tasks.training import storage_error_only

    store = CheckpointStore(str(tmp_path / "store"), retry_base_delay=0.01)
    calls = []

    def failing() -> None:
        calls.append(1)
        raise error

    with pytest.raises(StorageIOError) as err:
        store._io("write", str(tmp_path / "store" / "x"), failing)  # noqa: SLF001 - the store's guarded call
    assert len(calls) == (3 if transient else 1)

    class _State:
        def result(self) -> None:
            raise err.value

    assert storage_error_only(None, None, _State()) is transient
    assert err.value.transient is transient and isinstance(err.value, TransientStorageIOError) is transient
