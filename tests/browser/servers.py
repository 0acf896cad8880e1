"""The two servers a team runs, started for the browser tests as a user starts them (README, "Local team setup").

- ``prefect server start`` with its UI, on SQLite under a temporary PREFECT_HOME. Prefect's test harness
  (the ``prefect_api`` fixture) serves the API only (it sets PREFECT_UI_ENABLED=0), so the UI needs
  the real command.
- ``mlflow server`` on SQLite, artifacts proxied to a local folder (``--artifacts-destination``).

Each runs in its own session so the whole process group is killed at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port

QUIET_ENV = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@dataclass
class Server:
    """A server process and where it answers."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)


def _start(name: str, command: list[str], *, url: str, health: str, env: dict[str, str], cwd: Path,
           timeout_s: float) -> Server:
    log_path = cwd / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                   start_new_session=True)
    server = Server(name=name, url=url, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {server.tail()}")
        try:
            if httpx.get(url + health, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} did not answer {url + health} within {timeout_s:.0f} s: {server.tail()}")
        time.sleep(0.3)


def start_prefect(home: Path, *, timeout_s: float = 180) -> Server:
    """``prefect server start`` (API and UI) on 127.0.0.1:<free port>, SQLite under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET_ENV, PREFECT_HOME=str(home), PREFECT_UI_API_URL=f"{url}/api",
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return _start("prefect-server", command, url=url, health="/api/health", env=env, cwd=home, timeout_s=timeout_s)


def start_mlflow(home: Path, *, timeout_s: float = 120) -> Server:
    """``mlflow server`` on 127.0.0.1:<free port>: SQLite backend, artifacts proxied to ``home/artifacts``."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
               "--artifacts-destination", (home / "artifacts").as_uri()]
    return _start("mlflow-server", command, url=url, health="/health", env=env, cwd=home, timeout_s=timeout_s)
