"""The stack: Postgres, moto S3, Prefect server and MLflow server; on request the deployments and a worker."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import BUCKETS, ROOT, S3_ACCESS_KEY, S3_SECRET_KEY, StackError, clean_env, free_port, log
from .postgres import Postgres, find_pg_bin
from .processes import Service, basic_auth_header, http_ok, open_http, spawn, wait_until
from .reaper import Reaper


def _bin(name: str) -> str:
    """An executable of this Python environment (prefect, mlflow), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` is not installed in this environment")
    return found


@dataclass
class StackInfo:
    """Where everything is (URLs as seen from this machine)."""

    workdir: Path
    postgres_port: int = 0
    s3_url: str = ""
    prefect_api_url: str = ""
    prefect_auth_string: str = ""
    mlflow_url: str = ""
    pool: str = ""
    storage: str = ""
    worker_pd_home: Path | None = None

    def s3_env(self) -> dict[str, str]:
        """Client settings for the moto S3 API (boto3, s3fs and MLflow all read these)."""
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            # AWS_EC2_METADATA_DISABLED: no credential lookups against 169.254.169.254.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def prefect_client_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.prefect_api_url, "PREFECT_API_AUTH_STRING": self.prefect_auth_string}


class FullStack(contextlib.AbstractContextManager):
    """Start Postgres, moto S3, Prefect server and MLflow server; optionally deploy and start a worker.

    ``with FullStack(workdir) as stack:`` starts the servers; ``stack.deploy(...)`` and
    ``stack.start_worker(...)`` do steps 4. Leaving the block (normally or by an exception,
    KeyboardInterrupt included) stops everything that was started, in reverse order.
    """

    def __init__(self, workdir: Path, *, ui: bool = False, server_timeout_s: float = 180,
                 pg_bin: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ui = ui
        self.server_timeout_s = server_timeout_s
        self.pg_bin = pg_bin or find_pg_bin()
        self.info = StackInfo(workdir=self.workdir)
        self.services: dict[str, Service] = {}
        self.postgres: Postgres | None = None
        self._stack = contextlib.ExitStack()
        self._reaper = Reaper(self.workdir)
        self.timings: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> FullStack:
        self._stack.__enter__()
        try:
            self._reaper.start()
            self._stack.callback(self._reaper.stop)  # runs last, once everything else is stopped
            self._trap_sigterm()
            self._start_servers()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc_info) -> bool:
        log("stopping everything")
        start = time.monotonic()
        self._stack.__exit__(*exc_info)
        log(f"stopped ({time.monotonic() - start:.1f} s)")
        return False

    def _trap_sigterm(self) -> None:
        """While the stack is up, SIGTERM (a CI runner's cancel) unwinds like Ctrl-C, so cleanup runs."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous not in (signal.SIG_DFL, None):
            return  # someone (e.g. the CLI below) already handles it

        def on_sigterm(signum, frame):  # noqa: ARG001
            raise KeyboardInterrupt("SIGTERM")

        signal.signal(signal.SIGTERM, on_sigterm)
        self._stack.callback(signal.signal, signal.SIGTERM, previous)

    def _track(self, service: Service) -> Service:
        self.services[service.name] = service
        self._reaper.add_service(service.proc.pid)
        self._stack.callback(self._stop_service, service)
        return service

    def _stop_service(self, service: Service) -> None:
        service.stop()
        log(f"{service.name}: stopped")

    def _timed(self, key: str, start: float) -> None:
        self.timings[key] = round(time.monotonic() - start, 1)

    # -- servers ------------------------------------------------------------------------------------

    def _start_servers(self) -> None:
        if self.pg_bin is None:
            raise StackError("PostgreSQL server binaries (initdb, pg_ctl) not found; set PD_PG_BIN")
        t0 = time.monotonic()
        log(f"postgres: initdb + start ({self.pg_bin})")
        self._stack.callback(self._stop_postgres)
        self.postgres = Postgres.start(bin_dir=self.pg_bin, on_created=self._reaper.set_postgres)
        self.info.postgres_port = self.postgres.port
        self._timed("postgres", t0)
        log(f"postgres: ready on 127.0.0.1:{self.postgres.port} ({self.timings['postgres']} s)")

        t0 = time.monotonic()
        self._start_s3()
        self._timed("s3", t0)
        log(f"s3 (moto): ready at {self.info.s3_url}, buckets {', '.join(BUCKETS)} ({self.timings['s3']} s)")

        # The two slow starters (database migrations) start together and are awaited together.
        t0 = time.monotonic()
        prefect = self._spawn_prefect_server()
        mlflow = self._spawn_mlflow_server()
        headers = basic_auth_header(self.info.prefect_auth_string)
        took = wait_until("prefect server", lambda: http_ok(f"{self.info.prefect_api_url}/health", headers=headers),
                          timeout_s=self.server_timeout_s, services=(prefect, mlflow))
        log(f"prefect server: ready at {self.info.prefect_api_url} ({took:.1f} s)")
        took = wait_until("mlflow server", lambda: http_ok(f"{self.info.mlflow_url}/health"),
                          timeout_s=self.server_timeout_s, services=(prefect, mlflow))
        self._timed("prefect+mlflow servers", t0)
        log(f"mlflow server: ready at {self.info.mlflow_url} ({took:.1f} s)")

    def _stop_postgres(self) -> None:
        if self.postgres is not None:
            self.postgres.stop()
            log("postgres: stopped, cluster deleted")

    def _start_s3(self) -> None:
        port = free_port()
        service = self._track(spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    env=clean_env(), log_path=self.workdir / "logs" / "s3.log"))
        self.info.s3_url = f"http://127.0.0.1:{port}"
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError
        from botocore.parsers import ResponseParserError

        s3 = boto3.client("s3", endpoint_url=self.info.s3_url, region_name="us-east-1",
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

    def _spawn_prefect_server(self) -> Service:
        if self.postgres is None:
            raise StackError("prefect server: PostgreSQL is not started")
        port = free_port()
        self.info.prefect_api_url = f"http://127.0.0.1:{port}/api"
        self.info.prefect_auth_string = f"admin:{secrets.token_hex(12)}"
        env = clean_env(
            PREFECT_HOME=str(self.workdir / "prefect-server-home"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.postgres.url("prefect", driver="postgresql+asyncpg"),
            PREFECT_SERVER_API_AUTH_STRING=self.info.prefect_auth_string,
            PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
            PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        )
        cmd = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off",
               "--ui" if self.ui else "--no-ui"]
        return self._track(spawn("prefect-server", cmd, env=env, log_path=self.workdir / "logs" / "prefect-server.log"))

    def _spawn_mlflow_server(self) -> Service:
        if self.postgres is None:
            raise StackError("mlflow server: PostgreSQL is not started")
        port = free_port()
        self.info.mlflow_url = f"http://127.0.0.1:{port}"
        env = clean_env(
            **self.info.s3_env(),
            MLFLOW_S3_ENDPOINT_URL=self.info.s3_url,
            # No job runner (huey) in the server: nothing here uses server-side jobs.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        cmd = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", self.postgres.url("mlflow", driver="postgresql+psycopg2"),
               "--serve-artifacts", "--artifacts-destination", "s3://mlflow/",
               "--allowed-hosts", f"127.0.0.1,127.0.0.1:{port},localhost,localhost:{port}"]
        return self._track(spawn("mlflow-server", cmd, env=env, log_path=self.workdir / "logs" / "mlflow-server.log"))

    # -- deployments and worker ---------------------------------------------------------------------

    def deploy(self, *, pool: str, extra_args: tuple[str, ...] = (), timeout_s: float = 240) -> str:
        """Run the project's deploy script against the server (as a user would); returns its output."""
        t0 = time.monotonic()
        self.info.pool = pool
        env = clean_env(**self.info.prefect_client_env(), PREFECT_HOME=str(self.workdir / "deploy-home"))
        cmd = [sys.executable, "-m", "deployments.deploy", "--pool", pool, "--gpus", "0",
               "--code-dir", str(ROOT), *extra_args]
        log(f"deploy: {' '.join(cmd[1:])}")
        try:
            result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            output = f"{exc.stdout or ''}{exc.stderr or ''}"
            raise StackError(f"deploy did not finish in {timeout_s:.0f} s:\n{output}") from exc
        output = result.stdout + result.stderr
        (self.workdir / "logs" / "deploy.log").write_text(output)
        if result.returncode != 0:
            raise StackError(f"deploy failed ({result.returncode}):\n{output[-4000:]}")
        self._timed("deploy", t0)
        log(f"deploy: done ({self.timings['deploy']} s)")
        for line in result.stdout.splitlines():
            log(f"  {line}")
        return output

    def start_worker(self, *, pool: str, storage: str, timeout_s: float = 90, poll_s: float = 2.0) -> Service:
        """A process worker configured by environment only, as the compose `worker` service is."""
        t0 = time.monotonic()
        self.info.storage = storage
        self.info.worker_pd_home = self.workdir / "worker-pd-home"
        env = clean_env(
            **self.info.prefect_client_env(),
            **self.info.s3_env(),
            PREFECT_HOME=str(self.workdir / "worker-prefect-home"),
            # Pick up new flow runs quickly (defaults: 10 s).
            PREFECT_WORKER_QUERY_SECONDS=str(poll_s),
            PREFECT_WORKER_PREFETCH_SECONDS=str(poll_s),
            PREFECT_LOGGING_LEVEL="INFO",
            MLFLOW_TRACKING_URI=self.info.mlflow_url,
            PD_STORAGE=storage,
            PD_HOME=str(self.info.worker_pd_home),
            # s3fs reads the endpoint from fsspec's env config, botocore from AWS_ENDPOINT_URL_S3.
            FSSPEC_S3_ENDPOINT_URL=self.info.s3_url,
            AWS_ENDPOINT_URL_S3=self.info.s3_url,
        )
        cmd = [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--install-policy", "never",
               "--name", "fullstack-worker"]
        service = self._track(spawn("worker", cmd, env=env, log_path=self.workdir / "logs" / "worker.log"))
        url = f"{self.info.prefect_api_url}/work_pools/{pool}/workers/filter"
        headers = {**basic_auth_header(self.info.prefect_auth_string), "Content-Type": "application/json"}

        def online() -> bool:
            try:
                with open_http(url, data=b"{}", headers=headers, method="POST", timeout=5) as response:
                    workers = json.loads(response.read())
            except (OSError, ValueError):
                return False
            return any(w.get("name") == "fullstack-worker" and w.get("status") == "ONLINE" for w in workers)

        wait_until("worker", online, timeout_s=timeout_s, services=(service,))
        self._timed("worker", t0)
        log(f"worker: online in pool {pool!r} ({self.timings['worker']} s)")
        return service
