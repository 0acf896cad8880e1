"""The stack: Postgres, moto S3, Prefect server and MLflow server; on request the deployments and a worker."""

from __future__ import annotations

import contextlib
import secrets
import signal
import sys
import time
from pathlib import Path

from . import servers, worker
from .common import BUCKETS, StackError, free_port, log
from .info import StackInfo
from .postgres import Postgres, find_pg_bin
from .processes import Service, basic_auth_header, http_ok, wait_until
from .reaper import Reaper


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
        service = self._track(servers.spawn_s3(info=self.info, port=port))
        self.info.s3_url = f"http://127.0.0.1:{port}"
        servers.create_buckets(s3_url=self.info.s3_url, service=service)

    def _spawn_prefect_server(self) -> Service:
        if self.postgres is None:
            raise StackError("prefect server: PostgreSQL is not started")
        port = free_port()
        self.info.prefect_api_url = f"http://127.0.0.1:{port}/api"
        self.info.prefect_auth_string = f"admin:{secrets.token_hex(12)}"
        return self._track(servers.spawn_prefect_server(
            info=self.info, database_url=self.postgres.url("prefect", driver="postgresql+asyncpg"), port=port,
            ui=self.ui))

    def _spawn_mlflow_server(self) -> Service:
        if self.postgres is None:
            raise StackError("mlflow server: PostgreSQL is not started")
        port = free_port()
        self.info.mlflow_url = f"http://127.0.0.1:{port}"
        return self._track(servers.spawn_mlflow_server(
            info=self.info, database_url=self.postgres.url("mlflow", driver="postgresql+psycopg2"), port=port))

    def deploy(self, *, pool: str, extra_args: tuple[str, ...] = (), timeout_s: float = 240) -> str:
        """Run the project's deploy script against the server (as a user would); returns its output."""
        t0 = time.monotonic()
        self.info.pool = pool
        result = worker.run_deploy(info=self.info, pool=pool, extra_args=extra_args, timeout_s=timeout_s)
        self._timed("deploy", t0)
        log(f"deploy: done ({self.timings['deploy']} s)")
        for line in result.stdout.splitlines():
            log(f"  {line}")
        return result.stdout + result.stderr

    def start_worker(self, *, pool: str, storage: str, timeout_s: float = 90, poll_s: float = 2.0) -> Service:
        """A process worker configured by environment only, as the compose `worker` service is."""
        t0 = time.monotonic()
        self.info.storage = storage
        self.info.worker_pd_home = self.workdir / "worker-pd-home"
        service = self._track(worker.spawn_worker(info=self.info, pool=pool, poll_s=poll_s))
        worker.wait_online(info=self.info, pool=pool, service=service, timeout_s=timeout_s)
        self._timed("worker", t0)
        log(f"worker: online in pool {pool!r} ({self.timings['worker']} s)")
        return service
