"""The object store (moto S3) stops mid-round: bounded retries, a clear error, nothing partial, rerun."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pd_core import jobs
from pd_core.store import StorageIOError
from tests.faults.helpers import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    _assert_nothing_partial,
    _boto,
    _cfg,
    _fake_aws_env,
    _free_port,
    _one_line,
    _round_key,
    _start_moto,
    _state_step,
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_object_store_down_mid_round_fails_clearly_then_rerun_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _fake_aws_env(monkeypatch, tmp_path)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _start_moto(port)
    try:
        bucket = f"pd-faults-{uuid.uuid4().hex[:10]}"
        _boto(endpoint).create_bucket(Bucket=bucket)
        options = {"client_kwargs": {"endpoint_url": endpoint},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}
        cfg = _cfg("s3down", f"storage.root=s3://{bucket}/store", f"storage.storage_options={json.dumps(options)}",
                   "distill.log_every=3")
        store = jobs.open_store(cfg)  # what the tasks use: 3 attempts, 0.5 s then 1 s backoff
        teacher = jobs.ensure_teacher(cfg, store)
        key = _round_key(cfg, 1)
        stopped: dict[str, Any] = {}

        def stop_store(event: Any) -> None:
            if event.step == 6 and not stopped:  # after the in-round checkpoint at update 5
                stopped["state_step"] = _state_step(store, key)
                server.stop()
                stopped["at"] = time.monotonic()

        caplog.set_level(logging.WARNING, logger="pd_core.store")
        with pytest.raises(StorageIOError) as err:
            jobs.run_round(cfg, store, round_index=1, teacher=teacher, on_progress=stop_store)
        waited = time.monotonic() - stopped["at"]
        message = _one_line(err.value)
        assert stopped["state_step"] == 5
        assert "unreachable" in message and store.uri(jobs.state_key(key)) in message, message
        assert waited < 30, f"the outage took {waited:.1f}s to surface"
        # dict.fromkeys: a record can reach caplog twice when Prefect's logging setup also attached
        # handlers to pd_core (depends on what ran before in this pytest run); each retry's text is distinct.
        retries = list(dict.fromkeys(r.getMessage() for r in caplog.records
                                     if "transient storage error" in r.getMessage()))
        assert [m.rsplit(" ", 3)[1:] for m in retries[:2]] == [["1/2", "in", "0.50s"], ["2/2", "in", "1.00s"]], retries
        assert FAKE_SECRET not in message and FAKE_KEY_ID not in message

        # While the store is down nothing is mistaken for "not there, retrain": loads fail clearly too.
        with pytest.raises(StorageIOError, match="unreachable"):
            store.is_complete(teacher.key)
        with pytest.raises(StorageIOError, match="unreachable"):
            jobs.run_round(cfg, store, round_index=1, teacher=teacher)

        server = _start_moto(port)  # same port; moto keeps its buckets in-process across restarts
        assert store.is_complete(teacher.key), "the previous checkpoint must stay complete"
        assert not store.is_complete(key) and store.read_manifest(key) is None, "no partial round may be visible"
        assert _state_step(store, key) == 5
        for k in (teacher.key, key, jobs.state_key(key)):
            _assert_nothing_partial(store, k)

        again = jobs.run_round(cfg, store, round_index=1, teacher=teacher)
        assert again.trained and again.resumed_from == 5 and store.is_complete(key)
        assert _state_step(store, key) is None
    finally:
        server.stop()
