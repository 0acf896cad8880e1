"""An object store that stops answering (accepts connections, never replies) fails in bounded time, a log
line per retry; disk-full and permission errors are permanent: neither the store nor a task retries them."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pd_core.store import CheckpointStore, StorageIOError
from tests.store.helpers import _set_test_credentials


@dataclass
class PausedEndpoint:
    url: str
    requests: list[str]  # the request line of every request it received (none was ever answered)


@pytest.fixture
def paused_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PausedEndpoint]:
    """An S3 endpoint that is paused, not refusing: it accepts TCP connections and reads requests, never answers."""
    _set_test_credentials(monkeypatch, tmp_path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    endpoint = PausedEndpoint(url=f"http://127.0.0.1:{sock.getsockname()[1]}", requests=[])
    held: list[socket.socket] = []  # open until the end: a closed connection would be an answer

    def read_head(conn: socket.socket) -> None:
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            endpoint.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listening socket closed: done
            while True:
                conn, _ = sock.accept()
                held.append(conn)
                threading.Thread(target=read_head, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield endpoint
    finally:
        sock.close()
        for conn in held:
            conn.close()


def test_s3_requests_time_out_by_default_and_the_timeouts_can_be_set() -> None:
    from pd_core.store.objects import S3_CONFIG_DEFAULTS, with_s3_defaults

    assert S3_CONFIG_DEFAULTS["connect_timeout"] == 10 and S3_CONFIG_DEFAULTS["read_timeout"] == 30
    assert with_s3_defaults("s3://b/p", None)["config_kwargs"] == S3_CONFIG_DEFAULTS
    mine = with_s3_defaults("s3://b/p", {"config_kwargs": {"read_timeout": 5}, "anon": False})
    assert mine["config_kwargs"]["read_timeout"] == 5 and mine["config_kwargs"]["connect_timeout"] == 10
    assert mine["anon"] is False
    assert with_s3_defaults("/local/store", {"x": 1}) == {"x": 1}
    assert "config_kwargs" not in with_s3_defaults("memory://store", None)


@pytest.mark.timeout(120)  # a hang bound: 3 attempts of 1 s timeouts, whatever the machine's load
def test_a_paused_object_store_fails_after_three_attempts_with_a_line_per_retry(
        paused_endpoint: PausedEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    options = {"client_kwargs": {"endpoint_url": paused_endpoint.url},
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
    # Counted, not timed: 3 attempts reached the endpoint, one request each (botocore and s3fs retry nothing
    # themselves: no hidden retries multiply the timeout).
    puts = [r for r in paused_endpoint.requests if r.startswith("PUT /pd-paused/store/pipelines/x/report/")]
    assert len(puts) == 3 and len(set(puts)) == 1, paused_endpoint.requests
    # A hang bound, not a speed check: the 1 s timeouts were applied (3 attempts at the 30 s default would take
    # 90 s). It took 7 s on this 2-core machine at load average 6.
    assert seconds < 45, f"3 attempts with 1 s timeouts took {seconds:.1f}s: the timeouts were not applied"


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
