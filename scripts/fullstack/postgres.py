"""A throwaway PostgreSQL cluster on 127.0.0.1 (as the `postgres` user when run as root)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .common import PG_BIN_CANDIDATES, StackError, clean_env, free_port, log, tail
from .processes import descendants, send_signal


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
                send_signal([*descendants(pid), pid], signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)
