"""The stack's servers after Postgres: a moto S3 server with the stack's buckets, ``prefect server start``
on Postgres (basic auth on, analytics off) and ``mlflow server`` on Postgres with its artifacts proxied to
``s3://mlflow/``. Each is spawned in its own session, logging to ``<workdir>/logs/<name>.log``; the caller
tracks it (stops it when the stack stops)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .common import BUCKETS, S3_ACCESS_KEY, S3_SECRET_KEY, StackError, clean_env
from .info import StackInfo
from .processes import Service, spawn, wait_until


def env_bin(name: str) -> str:
    """An executable of this Python environment (prefect, mlflow), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` is not installed in this environment")
    return found


def spawn_s3(*, info: StackInfo, port: int) -> Service:
    """A moto S3 server on 127.0.0.1:``port``."""
    return spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 env=clean_env(), log_path=info.workdir / "logs" / "s3.log")


def create_buckets(*, s3_url: str, service: Service) -> None:
    """Wait (60 s at most) until the S3 API at ``s3_url`` answers, then create the stack's buckets."""
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                      aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                      config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def ready() -> bool:
        try:
            s3.list_buckets()
            return True
        except (BotoCoreError, ClientError, ResponseParserError):  # not listening, or not serving yet
            return False

    wait_until("s3 (moto)", ready, timeout_s=60, services=(service,), interval_s=0.3)
    for bucket in BUCKETS:
        s3.create_bucket(Bucket=bucket)


def spawn_prefect_server(*, info: StackInfo, database_url: str, port: int, ui: bool) -> Service:
    """``prefect server start`` on 127.0.0.1:``port`` with ``info.prefect_auth_string`` as its basic auth."""
    env = clean_env(
        PREFECT_HOME=str(info.workdir / "prefect-server-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_API_AUTH_STRING=info.prefect_auth_string,
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    cmd = [env_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off",
           "--ui" if ui else "--no-ui"]
    return spawn("prefect-server", cmd, env=env, log_path=info.workdir / "logs" / "prefect-server.log")


def spawn_mlflow_server(*, info: StackInfo, database_url: str, port: int) -> Service:
    """``mlflow server`` on 127.0.0.1:``port``, one worker, artifacts proxied to the S3 server at ``info.s3_url``."""
    env = clean_env(
        **info.s3_env(),
        MLFLOW_S3_ENDPOINT_URL=info.s3_url,
        # No job runner (huey) in the server: nothing here uses server-side jobs.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    cmd = [env_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", database_url,
           "--serve-artifacts", "--artifacts-destination", "s3://mlflow/",
           "--allowed-hosts", f"127.0.0.1,127.0.0.1:{port},localhost,localhost:{port}"]
    return spawn("mlflow-server", cmd, env=env, log_path=info.workdir / "logs" / "mlflow-server.log")
