"""Shared fixtures for the integration tests: an S3 endpoint (moto), a Prefect API, isolated homes.

Everything here is a real service on 127.0.0.1, nothing is mocked:
- ``moto_server``: moto's ThreadedMotoServer on a free port, with fake AWS credentials in the
  environment (so boto3/s3fs never look for real ones) and a ``make_bucket`` helper;
- ``prefect_api``: Prefect's test harness (a real Prefect server in a subprocess over a temporary
  SQLite database), started once per session; its URL can be handed to ``pd`` subprocesses;
- the session runs with its own PD_HOME and PREFECT_HOME under a temporary folder, and with the
  offline-hygiene variables of design section 4, so no test touches ~/.prefect or ./.pd.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before anything imports Prefect or MLflow (Prefect reads its settings once, at import).
os.environ["DO_NOT_TRACK"] = "true"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# A hang bound for a `pd run`'s temporary Prefect server (ours waits for the longer of this and 60 s, Prefect's own
# for this): a cold start takes ~15 s on this 2-core machine at load average 3.5, longer beside other work.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="pd-tests-"))
os.environ["PD_HOME"] = str(_SESSION_HOME / "pd")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["XDG_CONFIG_HOME"] = str(_SESSION_HOME / "config")  # the MLflow journal's signing key, not the user's
(_SESSION_HOME / "prefect").mkdir(parents=True, exist_ok=True)

# Fake credentials: long and distinctive, so a test can prove they are written nowhere.
FAKE_AWS_KEY_ID = "AKIAPDTESTFAKEKEY0001"
FAKE_AWS_SECRET = "pd-tests-fake-secret-Zq3xW9vL2mN8"
_AWS_ENV_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--ui-screenshots", metavar="DIR", default=None,
                     help="browser tests: also write small copies of their screenshots to DIR (docs/ui for the README)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 endpoint and what a client needs to reach it."""

    endpoint_url: str  # http://127.0.0.1:<port>
    make_bucket: Callable[[str | None], str]  # name (or None: a fresh unique one) -> bucket name

    def storage_options(self) -> dict:
        """``storage.storage_options`` for fsspec/s3fs (no credentials: they come from the environment)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}}


def set_fake_aws_env(mp: pytest.MonkeyPatch, tmp_dir: Path, *, key_id: str, secret: str) -> None:
    """Fake credentials only, and no ~/.aws files that could bring real ones into the tests."""
    mp.setenv("AWS_ACCESS_KEY_ID", key_id)
    mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", str(tmp_dir / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_dir / "no-aws-credentials"))
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3]:
    """moto's S3 on 127.0.0.1:<free port> for the whole session, with fake AWS credentials set."""
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    import boto3
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_ENV_TO_CLEAR:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_AWS_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe an instance-metadata endpoint
        mp.setenv("AWS_CONFIG_FILE", str(_SESSION_HOME / "no-aws-config"))  # ignore the user's ~/.aws
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(_SESSION_HOME / "no-aws-credentials"))
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request at INFO
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

        def make_bucket(name: str | None = None) -> str:
            name = name or f"pd-test-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=name)
            return name

        try:
            yield MotoS3(endpoint_url=endpoint, make_bucket=make_bucket)
        finally:
            server.stop()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API (the test harness: server subprocess + temporary SQLite) for the session; its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    # A loaded 2-core machine can take longer than the harness' default 30 s to start the server.
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(autouse=True)
def _pd_core_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's logging setup (done by any earlier in-process flow run) turns propagation off for
    its extra loggers (``pd_core``): turn it back on per test, so caplog sees pd_core's records
    whatever ran before. Order-independent tests, not a change to what the product logs."""
    monkeypatch.setattr(logging.getLogger("pd_core"), "propagate", True)


@pytest.fixture(scope="session")
def smoke_guided(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The smoke-guided preset run twice (same name, store and MLflow), shared by the files that need a finished
    guided pipeline: tests/pipeline/test_guided_run.py reads it, and benchmarks/guided/reproduce.py (whose
    ``--work`` layout it uses: ``store/``, ``mlflow.db``) reuses its checkpoints and evaluations instead of
    training the same pipeline again. Keys: home, tracking_uri, first / second (PipelineResult), their
    plain-data forms first_data / second_data, and each run's seconds."""
    import time

    from flows.pipeline import distillation_pipeline
    from tests.pipeline.helpers import as_plain_data

    home = tmp_path_factory.mktemp("pd-smoke-guided")
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    out: dict = {"home": home, "tracking_uri": tracking_uri}
    for run in ("first", "second"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PD_HOME", str(home))
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            mp.delenv("PD_STORAGE", raising=False)
            t0 = time.perf_counter()
            result = distillation_pipeline(preset="smoke-guided", storage=str(home / "store"),
                                           tracking_uri=tracking_uri)
            out.update({run: result, f"{run}_data": as_plain_data(result), f"{run}_s": time.perf_counter() - t0})
    print(f"\nsmoke-guided: first run {out['first_s']:.1f}s, second run {out['second_s']:.1f}s")
    return out


# The multi-node tests' session fixtures (one teacher and one two-node round for both test files).
from tests.multinode_rounds import mn_teacher, two_node_round  # noqa: E402, F401

# Under pytest-xdist (`make test`): whole files, and the files that share a session fixture, as work units.
from tests.parallel import (  # noqa: E402, F401
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_xdist_make_scheduler,
)
