"""What every part of the stack uses: constants, errors, progress lines, ports, environments."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")
BUCKETS = ("checkpoints", "mlflow")
# Fake credentials for the moto S3 API (moto accepts any); never real ones.
S3_ACCESS_KEY = "fullstack-test-key"
S3_SECRET_KEY = "fullstack-test-secret"  # noqa: S105 - a fake value for a local moto server
OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
# Variables of the caller that must not leak into the servers or the worker: the stack is
# configured here, explicitly (a developer's MLFLOW_TRACKING_URI would otherwise win).
_SCRUBBED_PREFIXES = ("PREFECT_", "MLFLOW_", "AWS_", "FSSPEC_", "PD_")


class StackError(RuntimeError):
    """A service did not start (the message ends with the tail of its log)."""


def log(message: str) -> None:
    """One progress line, timestamped (also visible under pytest -s)."""
    print(f"[fullstack {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    """The last ``n`` characters of a log file ('' if it does not exist)."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without Prefect/MLflow/AWS/fsspec/pd settings, telemetry off, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(OFFLINE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
