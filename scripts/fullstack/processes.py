"""Server processes: each in its own session, stopped with its whole process tree; HTTP readiness polls."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import ROOT, StackError, tail


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


def alive(pid: int) -> bool:
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


def send_signal(pids: list[int], sig: int) -> None:
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
            send_signal(tree, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and (self.proc.poll() is None or any(alive(p) for p in tree)):
                time.sleep(0.2)
            tree += [p for p in descendants(self.proc.pid) if p not in tree]
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            send_signal([p for p in tree if alive(p)], signal.SIGKILL)
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


def open_http(url: str, *, timeout: float, headers: Mapping[str, str] | None = None, data: bytes | None = None,
              method: str | None = None) -> Any:
    """``urlopen`` for http(s) URLs only (never ``file:`` or a custom scheme); ValueError for any other."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(  # noqa: S310 - the scheme is http(s), checked above
        url, data=data, headers=dict(headers or {}), method=method)
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the scheme is http(s), checked above


def http_ok(url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 3.0) -> bool:
    """True if GET ``url`` answers 200."""
    try:
        with open_http(url, headers=headers, timeout=timeout) as response:
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
