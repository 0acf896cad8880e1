"""Helpers of the fault tests (docs/faults.md has the full table of faults and the tests that inject them)."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pd_core import jobs
from pd_core.config import Config, load_config
from pd_core.store import CheckpointStore
from tests.conftest import set_fake_aws_env

REPO = Path(__file__).resolve().parents[2]
FAKE_KEY_ID = "AKIAPDFAULTSCANKEY42"  # distinctive, so a scan for them means something
FAKE_SECRET = "pd-faults-SeCrEt/9f3c+never-logged"
# Jobs-level runs: the smoke preset, shortened (a few seconds each on 2 CPU cores).
JOB_OVERRIDES = ["teacher.updates=20", "teacher.checkpoint_every=10", "teacher.log_every=10",
                 "distill.updates_per_round=20", "distill.checkpoint_every=5", "distill.log_every=10"]


def log_lines(records: list[logging.LogRecord], contains: str, *, level: int = logging.DEBUG) -> list[str]:
    """Distinct messages of ``records`` containing ``contains`` (with Prefect's logging set up by earlier tests in
    the session, one record can reach caplog twice: a line is counted once)."""
    return list(dict.fromkeys(r.getMessage() for r in records if contains in r.getMessage() and r.levelno >= level))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``pd ARGV`` in this process (flows.cli.main): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse --help: not an error path
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(name: str, *overrides: str) -> Config:
    return load_config(preset="smoke", overrides=[f"pipeline.name={name}", *JOB_OVERRIDES, *overrides])


def _round_key(cfg: Config, round_index: int) -> str:
    _, student_steps = cfg.distill.rounds()[round_index - 1]
    return jobs.round_key(cfg.pipeline.name, round_index=round_index, student_steps=student_steps)


def _names(store: CheckpointStore, key: str) -> set[str]:
    """Every file name in a checkpoint folder, temporary files included."""
    folder = store._path(key)  # noqa: SLF001 - tests look at the raw files
    store.fs.invalidate_cache(folder)
    try:
        return {posixpath.basename(p.rstrip("/")) for p in store.fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return set()


def _assert_nothing_partial(store: CheckpointStore, key: str) -> None:
    """Every data file under a final name holds exactly the bytes its content-addressed name promises."""
    folder = store._path(key)  # noqa: SLF001
    for name in _names(store, key):
        m = re.fullmatch(r"(model|state)-([0-9a-f]{16})\.safetensors", name)
        if m:
            digest = hashlib.sha256(store.fs.cat_file(f"{folder}/{name}")).hexdigest()
            assert digest[:16] == m.group(2), f"partial file under a final name: {key}/{name}"
        else:
            internal = {"manifest.json", "state.json", "lease.json", ".lease.lock"}
            assert name in internal or name.startswith(".tmp-"), name


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, repr(text)
    return text


def _state_step(store: CheckpointStore, key: str) -> int | None:
    saved = store.load_state(jobs.state_key(key))
    return None if saved is None else int(saved[1]["step"])


def _start_moto(port: int) -> Any:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def _boto(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=FAKE_KEY_ID,
                        aws_secret_access_key=FAKE_SECRET)


def _fake_aws_env(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    set_fake_aws_env(mp, tmp, key_id=FAKE_KEY_ID, secret=FAKE_SECRET)


def _copy_of(template: Path, tmp_path: Path, cfg: Config) -> tuple[CheckpointStore, jobs.CheckpointInfo]:
    """A private copy of the template store and its round-1 student (found complete, not retrained)."""
    shutil.copytree(template, tmp_path / "store")
    store = CheckpointStore(str(tmp_path / "store"), retry_base_delay=0.01)
    teacher = jobs.ensure_teacher(cfg, store)
    student = jobs.run_round(cfg, store, round_index=1, teacher=teacher)
    assert not teacher.trained and not student.trained
    return store, student


# ----------------------------------------------------------------------------------------------
# Whole pipeline (`pd run` in subprocesses, embedded Prefect and MLflow)


PIPELINE_FAST = ["teacher.updates=20", "teacher.checkpoint_every=10", "distill.start_steps=4",
                 "distill.updates_per_round=6", "distill.checkpoint_every=3", "distill.log_every=3",
                 "eval.num_samples=64", "eval.kid_subset_size=32", "eval.kid_subsets=4", "eval.classifier_epochs=1",
                 "eval.grid_size=2"]


def _pd_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PD_", "PREFECT_", "MLFLOW_")) and k != "PYTEST_CURRENT_TEST"}
    env.update({"PD_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "PYTHONPATH": str(REPO),
                "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "OMP_NUM_THREADS": "1", **extra})
    return env


def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@dataclass
class _Proc:
    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    home: Path
    rc: int | None = None
    extra: dict = field(default_factory=dict)

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pd run did not finish in {timeout}s: {self.err()[-3000:]}") from None
        return self.rc


def _pd(home: Path, args: list[str], env: dict[str, str], *, prelude: str = "") -> _Proc:
    home.mkdir(parents=True, exist_ok=True)
    code = ("import sys\nfrom tasks.env import prepare_environment\nprepare_environment()\n" + prelude +
            "from flows.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out, err = home.parent / f"{home.name}.out", home.parent / f"{home.name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=o, stderr=e, env=env, cwd=home)
    return _Proc(proc=proc, stdout=out, stderr=err, home=home)


def _wait_for(predicate: Any, proc: _Proc, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.proc.poll() is not None:
            raise AssertionError(f"pd run exited ({proc.proc.returncode}) before {what}: {proc.err()[-3000:]}")
        if time.monotonic() > deadline:
            proc.proc.kill()
            raise AssertionError(f"no {what} after {timeout}s: {proc.err()[-3000:]}")
        time.sleep(0.1)
