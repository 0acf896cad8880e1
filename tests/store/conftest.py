"""Fixtures of the store tests: a store on every backend (moto S3 on 127.0.0.1, fake credentials)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pd_core.store import (
    CheckpointStore,
)
from tests.store.helpers import KEY, _free_port, _make_store, _manifest, _set_test_credentials, _start_moto, _weights


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


@pytest.fixture(params=["path", "file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    return _make_store(request.param, request, tmp_path)


@pytest.fixture
def local_store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "store"), retry_base_delay=0.01)


@pytest.fixture
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    """A store (local or memory) holding one good checkpoint at KEY."""
    kind = getattr(request, "param", "path")
    s = _make_store(kind, request, tmp_path)
    s.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    return s
