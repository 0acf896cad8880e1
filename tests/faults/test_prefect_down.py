"""The Prefect API server of a ``pd run`` killed mid-run: one line, a bounded exit, a rerun that continues.

Real parts: ``pd run`` in a child process with its embedded Prefect server; the test kills that
server (the uvicorn child of the ``pd`` process this test started, found by its parent pid, never
by name: other servers on the machine are left alone).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tasks.prefect_watch import gone_message, watch_api
from tests.pipeline.helpers import pd_command

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

SHORT = ["teacher.updates=30", "distill.final_steps=2", "distill.updates_per_round=10",
         "distill.last_rounds_updates=10", "eval.enabled=false"]
SERVER_APP = "prefect.server.api.server:create_app"
EXIT_BOUND_S = 60  # the watch looks every 0.5 s; without it a run took minutes to end


def _prefect_server_child(pid: int) -> int | None:
    """The pid of the embedded Prefect server that process ``pid`` started, if it runs."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if SERVER_APP in cmdline:
                return int(child)
    return None


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PD_DEBUG", "PD_PREFECT_EARLY_START", "PD_STORAGE", "MLFLOW_TRACKING_URI")}
    return {**env, "PD_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}


def test_a_killed_prefect_server_ends_the_run_in_one_line_and_a_rerun_continues(tmp_path: Path) -> None:
    home = tmp_path / "home"
    args = [*pd_command(), "run", "--preset", "smoke", "--name", "apigone", "--storage", str(tmp_path / "store"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *[a for kv in SHORT for a in ("--set", kv)]]
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    teacher_saved = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "teacher saved to" in line:
                teacher_saved.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert teacher_saved.wait(300), "\n".join(lines[-20:])
        server = _prefect_server_child(proc.pid)
        assert server is not None, "the run's embedded Prefect server was not found"
        os.kill(server, signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(timeout=EXIT_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert rc == 1, "\n".join(lines[-20:])
    url = re.search(r"temporary server (http://127\.0\.0\.1:\d+/api)", "\n".join(lines)).group(1)
    assert lines[-1] == gone_message(url), "\n".join(lines[-20:])
    assert lines[-1].startswith("error: the Prefect API at http://127.0.0.1:")
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert not any("Traceback" in line or "All connection attempts failed" in line for line in lines), lines[-20:]
    assert time.monotonic() - killed < EXIT_BOUND_S
    teacher_line = next(line for line in lines if "teacher saved to" in line)

    rerun = subprocess.run(args, cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "teacher step" not in rerun.stderr and "teacher saved to" not in rerun.stderr  # kept, not retrained
    teacher_uri = teacher_line.split("teacher saved to ")[1].split()[0]
    assert f"teacher     {teacher_uri}" in rerun.stdout
    assert "pipeline apigone finished" in rerun.stdout
    assert "the previous run of this pipeline" in rerun.stderr and "died without ending" in rerun.stderr  # reconciled


def test_a_standing_server_that_stops_answering_is_given_up_after_several_misses() -> None:
    gone: list[str] = []
    done = threading.Event()

    def on_gone(message: str) -> None:
        gone.append(message)
        done.set()

    url = "http://127.0.0.1:9/api"  # the discard port: nothing listens there
    with watch_api(api_url=url, interval_s=0.01, misses=3, timeout_s=0.2, on_gone=on_gone):
        assert done.wait(30)
    assert gone == [gone_message(url)]


class _Looked:
    """A process whose ``poll`` (the watch's look at the embedded server) is counted; ``seen`` is set after ``n``."""

    def __init__(self, proc: subprocess.Popen, n: int) -> None:
        self.proc, self.n, self.looks, self.seen = proc, n, 0, threading.Event()

    def poll(self) -> int | None:
        self.looks += 1
        if self.looks >= self.n:
            self.seen.set()
        return self.proc.poll()


def test_an_embedded_server_that_answers_is_never_given_up() -> None:
    gone: list[str] = []
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        looked = _Looked(sleeper, n=20)  # counted looks, not a sleep: a slow machine looks less often, not fewer times
        with watch_api(embedded_process=looked, api_url="http://127.0.0.1:1/api", interval_s=0.01,
                       on_gone=gone.append):
            assert looked.seen.wait(60), f"the watch stopped looking after {looked.looks}: {gone}"  # a hang bound
        assert gone == []
        sleeper.kill()
        sleeper.wait()
        done = threading.Event()
        with watch_api(embedded_process=sleeper, api_url="http://127.0.0.1:1/api", interval_s=0.01,
                       on_gone=lambda m: (gone.append(m), done.set())):
            assert done.wait(30)
        assert gone == [gone_message("http://127.0.0.1:1/api")]
    finally:
        sleeper.kill()
        sleeper.wait()
