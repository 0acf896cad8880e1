"""The reaper: cleanup when the process that started the stack dies without running its own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT, clean_env, log
from .postgres import Postgres, stop_cluster
from .processes import alive, descendants, send_signal

# The reaper runs as this command-line entry point with --reap.
ENTRY_POINT = ROOT / "scripts" / "fullstack_services.py"


class Reaper:
    """A small watchdog process (``scripts/fullstack_services.py --reap``) in its own session.

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
                [sys.executable, str(ENTRY_POINT), "--reap", str(self.path), "--parent", str(os.getpid())],
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
    while alive(parent):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
        for root in state.get("services", []):
            if alive(root):
                known.setdefault(root, set()).update([root, *descendants(root)])
        time.sleep(poll_s)
    log(f"reaper: parent {parent} is gone without stopping the stack; cleaning up")
    for root, pids in known.items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, signal.SIGKILL)
        send_signal([p for p in pids | set(descendants(root)) if alive(p)], signal.SIGKILL)
    pg = state.get("postgres")
    if pg:
        stop_cluster(bin_dir=Path(pg["bin_dir"]), base=Path(pg["base"]), as_postgres=bool(pg["as_postgres"]))
    log("reaper: done")
    return 0
