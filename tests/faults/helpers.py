"""Helpers of the fault tests (docs/faults.md has the full table of faults and the tests that inject them)."""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import shutil
import socket
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
