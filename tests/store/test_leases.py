"""Leases: never two writers on one store key."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pd_core.store import (
    CheckpointStore,
    LeaseHeldError,
    LeaseLostError,
    StoreError,
)
from tests.store.helpers import _folder, _make_store, _one_line


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
