"""The team-server stack without Docker: the same kinds of servers as docker-compose.yml, on loopback.

    python scripts/fullstack_services.py            # start everything, print the URLs; Ctrl-C stops it
    python scripts/fullstack_services.py --no-worker --ui

Used by tests/test_fullstack.py. :class:`FullStack` (a context manager) starts, in this order:

1. PostgreSQL (the installed server binaries, a throwaway cluster in a temp dir; as the `postgres`
   user when run as root) with databases `prefect` and `mlflow`, each owned by its own role;
2. a moto S3 server (the S3 API) with buckets `checkpoints` and `mlflow`;
3. `prefect server start` on Postgres (basic auth on, analytics off) and `mlflow server` on
   Postgres with artifacts proxied to `s3://mlflow/` (both started together, then awaited);
4. on request: `python -m deployments.deploy` against that server (work pool, `gpu` tag limit,
   deployments and their triggers) and a `prefect worker start --type process` configured by
   environment only, as the compose worker is (PD_STORAGE, MLFLOW_TRACKING_URI, the S3 endpoint).

Every port is picked free on 127.0.0.1 and every wait is bounded. Each server runs in its own
session; stopping it kills its process group and every descendant that left the group (a process
worker starts flow runs in new sessions). Everything is stopped in reverse order when the `with`
block ends, also on an exception, Ctrl-C or SIGTERM; if the starting process dies without running
that (SIGKILL), a small reaper process kills the servers and deletes the Postgres cluster.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def _bin(name: str) -> str:
    """An executable of this Python environment (prefect, mlflow), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` is not installed in this environment")
    return found


# ------------------------------------------------------------------------------------------------
# Processes


def _children_map() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc (Linux)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces or parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first)."""
    if not Path("/proc").is_dir():
        return []
    children, out, todo = _children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Service:
    """A server process started in its own session, with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def check_running(self) -> None:
        """Raise StackError with the log's tail if the process has exited."""
        if self.proc.poll() is not None:
            raise StackError(f"{self.name} exited with code {self.proc.returncode}:\n{tail(self.log_path)}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group and every descendant, SIGKILL what is left after ``grace_s``."""
        if self.proc.poll() is None or descendants(self.proc.pid):
            tree = descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            _signal(tree, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and (self.proc.poll() is None or any(_alive(p) for p in tree)):
                time.sleep(0.2)
            tree += [p for p in descendants(self.proc.pid) if p not in tree]
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            _signal([p for p in tree if _alive(p)], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def spawn(name: str, cmd: list[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None) -> Service:
    """Start ``cmd`` in a new session with stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    setpriv = shutil.which("setpriv")
    if setpriv:
        # Best effort for when no cleanup code can run (the test runner SIGKILLed): the server gets
        # SIGTERM when its parent dies. setpriv execs the command, so the pid stays the server's.
        cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=str(cwd or ROOT), start_new_session=True)
    return Service(name=name, proc=proc, log_path=log_path)


def basic_auth_header(auth_string: str | None) -> dict[str, str]:
    """The Authorization header for Prefect's basic auth ("user:password")."""
    if not auth_string:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def http_ok(url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 3.0) -> bool:
    """True if GET ``url`` answers 200."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def wait_until(what: str, ready: Callable[[], bool], *, timeout_s: float, services: tuple[Service, ...] = (),
               interval_s: float = 0.5) -> float:
    """Poll ``ready`` until it is true (returns the seconds it took); StackError on timeout or a dead service."""
    start = time.monotonic()
    while True:
        for service in services:
            service.check_running()
        if ready():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            logs = "\n".join(f"--- {s.name} ({s.log_path}):\n{tail(s.log_path)}" for s in services)
            raise StackError(f"{what}: not ready after {timeout_s:.0f} s\n{logs}")
        time.sleep(interval_s)


# ------------------------------------------------------------------------------------------------
# PostgreSQL


def find_pg_bin() -> Path | None:
    """The PostgreSQL server binaries (initdb, pg_ctl): $PD_PG_BIN, a Debian path, or PATH."""
    candidates = [os.environ.get("PD_PG_BIN", ""), *PG_BIN_CANDIDATES]
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (password auth over TCP)."""

    bin_dir: Path
    base: Path
    port: int
    superuser_password: str
    passwords: dict[str, str] = field(default_factory=dict)  # role -> password
    _as_postgres: bool = False

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "postgres.log"

    def url(self, role: str, *, driver: str = "postgresql") -> str:
        """The SQLAlchemy URL of the database named like ``role`` (its owner)."""
        return f"{driver}://{role}:{self.passwords[role]}@127.0.0.1:{self.port}/{role}"

    def _run(self, args: list[str], *, timeout_s: float) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=self.base,
                                env=clean_env(LC_ALL="C.UTF-8"))
        if result.returncode != 0:
            raise StackError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout[-2000:]}"
                             f"{result.stderr[-2000:]}\n{tail(self.log_path)}")
        return result

    @classmethod
    def start(cls, *, bin_dir: Path, roles: tuple[str, ...] = ("prefect", "mlflow"), timeout_s: float = 60,
              on_created: Callable[[Postgres], None] | None = None) -> Postgres:
        """initdb + pg_ctl start + one role and one database per name in ``roles``.

        ``on_created`` is called with the cluster before anything runs (the reaper registers it).
        """
        as_postgres = os.geteuid() == 0  # postgres refuses to run as root
        # Not under pytest's tmp dir: that one is private to root, and the server runs as `postgres`.
        base = Path(tempfile.mkdtemp(prefix="pd-fullstack-pg-"))
        pg = cls(bin_dir=bin_dir, base=base, port=free_port(), superuser_password=secrets.token_hex(16),
                 passwords={r: secrets.token_hex(16) for r in roles}, _as_postgres=as_postgres)
        try:
            if on_created is not None:
                on_created(pg)
            (base / "sock").mkdir()
            pwfile = base / "pwfile"
            pwfile.write_text(pg.superuser_password + "\n")
            if as_postgres:
                for path in (base, base / "sock", pwfile):
                    shutil.chown(path, "postgres", "postgres")
            # Throwaway cluster: no fsync anywhere (initdb --no-sync, fsync=off); trust only on
            # the private Unix socket, passwords (scram) over TCP as on the compose network.
            pg._run(["initdb", "-D", str(pg.data_dir), "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8",
                     "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
                     "--no-instructions"], timeout_s=timeout_s)
            opts = (f"-p {pg.port} -k {base / 'sock'} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off "
                    f"-c full_page_writes=off -c max_connections=200")
            pg._run(["pg_ctl", "-D", str(pg.data_dir), "-l", str(pg.log_path), "-o", opts, "-w",
                     "-t", str(int(timeout_s)), "start"], timeout_s=timeout_s + 10)
            pg._create_databases(roles)
        except BaseException:
            pg.stop()
            raise
        return pg

    def _create_databases(self, roles: tuple[str, ...]) -> None:
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                password=self.superuser_password, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for role in roles:
                    cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
                                [self.passwords[role]])
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(role),
                                                                               sql.Identifier(role)))
                    # As in docker/postgres: each role reaches only its own database.
                    cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(role)))
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the server (immediate: it is thrown away) and delete the cluster."""
        stop_cluster(bin_dir=self.bin_dir, base=self.base, as_postgres=self._as_postgres)

    def reaper_entry(self) -> dict[str, object]:
        return {"bin_dir": str(self.bin_dir), "base": str(self.base), "as_postgres": self._as_postgres}


def stop_cluster(*, bin_dir: Path, base: Path, as_postgres: bool) -> None:
    """pg_ctl stop -m immediate (else SIGKILL the postmaster), then delete the cluster folder."""
    data_dir = Path(base) / "data"
    pid_file = data_dir / "postmaster.pid"
    if pid_file.exists():
        cmd = [str(Path(bin_dir) / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "-t", "30", "stop"]
        if as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=40, cwd=base, env=clean_env())
            failed = result.returncode != 0 and pid_file.exists()
            reason = (result.stderr or result.stdout).strip()[-300:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            failed, reason = True, str(exc)
        if failed:
            log(f"postgres: pg_ctl stop failed ({reason}); killing the postmaster")
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pid_file.read_text().splitlines()[0])
                _signal([*descendants(pid), pid], signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The reaper: cleanup when the process that started the stack dies without running its own


class Reaper:
    """A small watchdog process (this script, ``--reap``) in its own session.

    It learns the stack's processes from a JSON file, snapshots their process trees every second
    and, if the parent dies without stopping it first (SIGKILL, os._exit), kills those trees and
    stops and deletes the Postgres cluster. A normal stop ends it with SIGTERM, doing nothing.
    """

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "reaper.json"
        self.state: dict[str, object] = {"services": [], "postgres": None}
        self.proc: subprocess.Popen | None = None

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)

    def start(self) -> None:
        self._write()
        log_path = self.path.parent / "logs" / "reaper.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--reap", str(self.path), "--parent", str(os.getpid())],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=clean_env())

    def add_service(self, pid: int) -> None:
        self.state["services"].append(pid)  # type: ignore[union-attr]
        self._write()

    def set_postgres(self, pg: Postgres) -> None:
        self.state["postgres"] = pg.reaper_entry()
        self._write()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.path.unlink()


def reap(path: Path, parent: int, *, poll_s: float = 1.0) -> int:
    """The reaper's loop (see :class:`Reaper`)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    known: dict[int, set[int]] = {}  # service root pid -> pids seen in its tree
    state: dict = {}
    while _alive(parent):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
        for root in state.get("services", []):
            if _alive(root):
                known.setdefault(root, set()).update([root, *descendants(root)])
        time.sleep(poll_s)
    log(f"reaper: parent {parent} is gone without stopping the stack; cleaning up")
    for root, pids in known.items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, signal.SIGKILL)
        _signal([p for p in pids | set(descendants(root)) if _alive(p)], signal.SIGKILL)
    pg = state.get("postgres")
    if pg:
        stop_cluster(bin_dir=Path(pg["bin_dir"]), base=Path(pg["base"]), as_postgres=bool(pg["as_postgres"]))
    log("reaper: done")
    return 0


# ------------------------------------------------------------------------------------------------
# The stack


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

        s3 = boto3.client("s3", endpoint_url=self.info.s3_url, region_name="us-east-1",
                          aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                          config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

        def ready() -> bool:
            try:
                s3.list_buckets()
                return True
            except Exception:
                return False

        wait_until("s3 (moto)", ready, timeout_s=60, services=(service,), interval_s=0.3)
        for bucket in BUCKETS:
            s3.create_bucket(Bucket=bucket)

    def _spawn_prefect_server(self) -> Service:
        assert self.postgres is not None
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
        assert self.postgres is not None
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
            request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    workers = json.loads(response.read())
            except (OSError, ValueError):
                return False
            return any(w.get("name") == "fullstack-worker" and w.get("status") == "ONLINE" for w in workers)

        wait_until("worker", online, timeout_s=timeout_s, services=(service,))
        self._timed("worker", t0)
        log(f"worker: online in pool {pool!r} ({self.timings['worker']} s)")
        return service


def main(argv: list[str] | None = None) -> int:
    """Start the stack, print how to use it, wait for Ctrl-C."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="logs and state (default: a new temp dir)")
    p.add_argument("--pool", default="fullstack-pool")
    p.add_argument("--storage", default="s3://checkpoints/pd")
    p.add_argument("--no-worker", action="store_true", help="servers only: no deploy, no worker")
    p.add_argument("--ui", action="store_true", help="serve the Prefect UI")
    p.add_argument("--reap", default=None, help=argparse.SUPPRESS)  # internal: the reaper process
    p.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reap:
        return reap(Path(args.reap), args.parent)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pd-fullstack-"))
    with FullStack(workdir, ui=args.ui) as stack:
        if not args.no_worker:
            stack.deploy(pool=args.pool)
            stack.start_worker(pool=args.pool, storage=args.storage)
        i = stack.info
        print(f"\nPrefect API   {i.prefect_api_url}   (PREFECT_API_AUTH_STRING={i.prefect_auth_string})")
        print(f"MLflow        {i.mlflow_url}")
        print(f"S3 (moto)     {i.s3_url}   (AWS_ACCESS_KEY_ID={S3_ACCESS_KEY} AWS_SECRET_ACCESS_KEY={S3_SECRET_KEY})")
        print(f"Postgres      127.0.0.1:{i.postgres_port}")
        print(f"logs          {workdir / 'logs'}\n")
        print(f"export PREFECT_API_URL={i.prefect_api_url} PREFECT_API_AUTH_STRING={i.prefect_auth_string}")
        if not args.no_worker:
            print("prefect deployment run train-teacher/pd-teacher -p preset=smoke -p name=demo")
        print(f"(logs are kept in {workdir})\n")
        print("Ctrl-C stops everything.")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
