"""The early-started Prefect server of `pd run` (tasks/prefect_server.py): real uvicorn processes.

Every server here is a real Prefect API on a loopback port, in a fresh PREFECT_HOME; the scripts
run in their own interpreters so Prefect's process-wide settings of this test process stay as
the harness set them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tasks.common import GPU_TAG, gpu_task_tags
from tasks.prefect_server import EARLY_START_ENV, EMBEDDED_URL_ENV, EmbeddedServer, is_embedded, spawn
from tests.pipeline.helpers import pd_command

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", EMBEDDED_URL_ENV, "PREFECT_UI_URL", "MLFLOW_TRACKING_URI", "PD_STORAGE",
                        "PD_DEBUG")}
    return {**env, "PD_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "home" / "prefect"),
            "PYTHONPATH": str(ROOT), **extra}


def _python(script: str, *, tmp_path: Path, env: dict[str, str], timeout: float = 300) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last, which is returned."""
    (tmp_path / "home" / "prefect").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _gone(pid: int, *, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_embedded_marker_keeps_gpu_tags_off_the_one_process_server() -> None:
    env = {EMBEDDED_URL_ENV: "http://127.0.0.1:5123/api"}
    assert is_embedded("http://127.0.0.1:5123/api", environ=env)
    assert not is_embedded("http://127.0.0.1:4200/api", environ=env)  # a standing server is never embedded
    assert not is_embedded(None, environ=env) and not is_embedded("http://127.0.0.1:5123/api", environ={})
    os.environ[EMBEDDED_URL_ENV] = "http://127.0.0.1:5123/api"
    try:
        assert gpu_task_tags(None, api_url="http://127.0.0.1:5123/api") == []
        assert gpu_task_tags(None, api_url="http://prefect:4200/api") == [GPU_TAG]
        assert gpu_task_tags(["a100"], api_url="http://127.0.0.1:5123/api") == ["a100"]
    finally:
        del os.environ[EMBEDDED_URL_ENV]


def test_spawn_starts_nothing_when_an_api_is_set_or_early_start_is_off(prefect_api: str) -> None:
    assert spawn(environ={"PREFECT_API_URL": "http://prefect:4200/api"}) is None
    assert spawn(environ={EARLY_START_ENV: "0"}) is None
    # Prefect is loaded here with the harness' server as its API (not in the environment): nothing to start
    assert spawn(environ={}) is None


def test_early_server_runs_the_flow_and_dies_with_its_process(tmp_path: Path) -> None:
    """spawn -> import Prefect -> attach -> a flow and a task on it; stopped at exit, and on SIGKILL of the parent."""
    result = _python("""
        import json, os, time
        from tasks.prefect_server import spawn, EMBEDDED_URL_ENV
        server = spawn()
        from prefect import flow, task
        from prefect.client.orchestration import get_client
        from prefect.settings import get_current_settings
        assert server.attach(), "attach failed"

        @task
        def double(x):
            return 2 * x

        @flow
        def hello():
            return double(21)

        with server.flow_settings():
            heartbeat = get_current_settings().flows.heartbeat_frequency
            value = hello()
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
        print(json.dumps({"value": value, "port": server.port, "pid": server.process.pid,
                          "url": get_current_settings().api.url, "embedded": os.environ[EMBEDDED_URL_ENV],
                          "ui": get_current_settings().ui_url, "heartbeat": heartbeat,
                          "runs": [r.state.name for r in runs]}))
    """, tmp_path=tmp_path, env=_env(tmp_path))
    assert result["value"] == 42 and result["runs"] == ["Completed"]
    assert result["url"] == result["embedded"] == f"http://127.0.0.1:{result['port']}/api"
    assert not result["ui"]  # no UI is served: Prefect prints no "View at" link to it
    assert result["heartbeat"] is None
    assert _gone(result["pid"], within_s=60) and not _port_open(result["port"])  # stopped at exit

    # SIGKILL of the parent: no exit handler runs; the kernel's parent-death signal stops the server
    script = textwrap.dedent("""
        import os, sys, time
        from tasks.prefect_server import spawn
        server = spawn()
        print(server.process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        assert os.getpgid(child) != os.getpgid(parent.pid)  # a Ctrl-C to the run's process group spares it
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _gone(child, within_s=60), "the server outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_an_api_only_prefect_knows_wins(tmp_path: Path) -> None:
    """An API URL set where only Prefect looks (prefect.toml): attach stops the early server and leaves it be."""
    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:9/api"\n')
    result = _python("""
        import json
        from tasks.prefect_server import spawn
        server = spawn()
        import prefect
        from prefect.settings import get_current_settings
        attached = server.attach()
        print(json.dumps({"attached": attached, "status": server.process.poll(),
                          "url": get_current_settings().api.url}))
    """, tmp_path=tmp_path, env=_env(tmp_path))
    assert result["attached"] is False and result["url"] == "http://127.0.0.1:9/api"
    assert result["status"] is not None  # stopped, not left running


def test_wait_relaunches_once_when_the_port_was_taken(tmp_path: Path) -> None:
    """uvicorn exits 3 when its port is taken between our choice and its bind: one relaunch on a new port."""
    launches: list[int] = []

    def launch(port: int) -> subprocess.Popen:
        launches.append(port)
        if len(launches) == 1:  # a real process that exits like uvicorn on a taken port
            return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        return subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    (tmp_path / "api" / "admin").mkdir(parents=True)
    (tmp_path / "api" / "admin" / "version").write_text('"3"')
    first = launch(0)
    first.wait()
    server = EmbeddedServer(process=first, port=0, started=time.perf_counter(), launch=launch)
    try:
        assert server.wait(timeout_s=120)  # a start on a loaded machine; a hang bound
        assert len(launches) == 2 and server.port == launches[1] != 0
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_pd_run_starts_the_server_first_and_leaves_nothing_running(tmp_path: Path) -> None:
    """The real CLI on embedded defaults: one line about the server, no dead UI link, nothing left listening."""
    overrides = ["teacher.updates=10", "teacher.checkpoint_every=10", "teacher.log_every=5",
                 "distill.final_steps=4", "distill.updates_per_round=4", "distill.checkpoint_every=4",
                 "eval.enabled=false", "runtime.threads=1"]
    env = _env(tmp_path)
    (tmp_path / "home").mkdir()
    proc = subprocess.run([*pd_command(), "run", "--preset", "smoke", "--name", "early",
                           *[a for o in overrides for a in ("--set", o)]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = [line for line in out.splitlines() if "Prefect API: temporary server" in line]
    assert len(lines) == 1, out[-4000:]
    port = int(lines[0].split("http://127.0.0.1:")[1].split("/")[0])
    assert "View at" not in out and "Error logging to API" not in out
    assert not _port_open(port)
    assert "pipeline early finished" in out


def test_config_resolves_without_torch_so_the_server_starts_first(tmp_path: Path) -> None:
    """`pd run` spawns the server right after resolving the config: that step must not pay torch's import."""
    result = _python("""
        import json, sys
        from tasks.common import resolve_config
        cfg = resolve_config(preset="smoke", name="x", overrides=["runtime.threads=1"])
        print(json.dumps({"torch": "torch" in sys.modules, "prefect": "prefect" in sys.modules,
                          "name": cfg.pipeline.name}))
    """, tmp_path=tmp_path, env=_env(tmp_path))
    assert result == {"torch": False, "prefect": False, "name": "x"}
