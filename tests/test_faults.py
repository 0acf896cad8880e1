"""Faults a multi-day distillation meets, injected for real (issue 9); docs/faults.md has the full table.

What this file adds to the store/config/data/tracking tests (which already cover checkpoint
tampering, pickle payloads, crash mid-save, lease conflicts, disk-full/permission errors at the
store level, IDX errors, config properties and the MLflow outage journal):

- a worker SIGKILLed mid-round resumes to bit-identical weights (pd_core.jobs, subprocesses, CPU);
- the object store (moto S3) stops mid-round: bounded retries, a clear error, nothing partial, rerun;
- MLflow unreachable while jobs train (jobs level) and for a whole ``pd run`` (integration);
- a NaN loss stops the round within one log window, naming round and steps;
- disk full / permission denied while a round saves (jobs level);
- ``pd config`` / ``pd run`` with bad input: exit 2, one line, no traceback (hypothesis);
- a second ``pd run`` with the same name is refused while the first holds the lease (integration);
- the test credentials appear nowhere in MLflow, Prefect's DB/logs, the store or the output (integration).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pd_core import jobs  # noqa: E402
from pd_core.config import Config, ConfigError, flatten, load_config  # noqa: E402
from pd_core.store import CheckpointStore, StorageIOError, StoreError  # noqa: E402
from pd_core.train import NonFiniteLossError  # noqa: E402
from tests.conftest import set_fake_aws_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY_ID = "AKIAPDFAULTSCANKEY42"  # distinctive, so a scan for them means something
FAKE_SECRET = "pd-faults-SeCrEt/9f3c+never-logged"
# Jobs-level runs: the smoke preset, shortened (a few seconds each on 2 CPU cores).
JOB_OVERRIDES = ["teacher.updates=20", "teacher.checkpoint_every=10", "teacher.log_every=10",
                 "distill.updates_per_round=20", "distill.checkpoint_every=5", "distill.log_every=10"]


# ----------------------------------------------------------------------------------------------
# Helpers


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


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store holding the teacher and round 1 of pipeline ``faults`` (copied by each test)."""
    root = tmp_path_factory.mktemp("template") / "store"
    cfg = _cfg("faults")
    store = CheckpointStore(str(root))
    teacher = jobs.ensure_teacher(cfg, store)
    jobs.run_round(cfg, store, round_index=1, teacher=teacher)
    return root


def _copy_of(template: Path, tmp_path: Path, cfg: Config) -> tuple[CheckpointStore, jobs.CheckpointInfo]:
    """A private copy of the template store and its round-1 student (found complete, not retrained)."""
    shutil.copytree(template, tmp_path / "store")
    store = CheckpointStore(str(tmp_path / "store"), retry_base_delay=0.01)
    teacher = jobs.ensure_teacher(cfg, store)
    student = jobs.run_round(cfg, store, round_index=1, teacher=teacher)
    assert not teacher.trained and not student.trained
    return store, student


# ----------------------------------------------------------------------------------------------
# Worker killed (SIGKILL) mid-round


WORKER = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from pd_core import jobs
from pd_core.config import load_config
from pd_core.store import CheckpointStore

root, results, marker = sys.argv[1:4]
overrides, stop = json.loads(sys.argv[4]), json.loads(sys.argv[5])  # stop: [phase, update] or null
cfg = load_config(preset="smoke", overrides=overrides)
store = CheckpointStore(root)

def on_progress(event):
    if stop and event.phase.split(" (")[0] == stop[0] and event.step >= stop[1]:
        with open(marker, "w") as f:
            f.write(f"{event.phase} {event.step}")
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen here until the test SIGKILLs it

def done(info):
    with open(results, "a") as f:
        f.write(json.dumps(info.as_dict()) + "\n")

info = jobs.ensure_teacher(cfg, store, on_progress=on_progress)
done(info)
for index, _ in enumerate(cfg.distill.rounds(), start=1):
    info = jobs.run_round(cfg, store, round_index=index, teacher=info, on_progress=on_progress)
    done(info)
'''

KILL_OVERRIDES = ["teacher.updates=30", "teacher.checkpoint_every=10", "teacher.log_every=5",
                  "distill.updates_per_round=24", "distill.checkpoint_every=5", "distill.log_every=4",
                  "runtime.threads=1"]


@dataclass
class _Worker:
    """One worker process: its results (one CheckpointInfo dict per finished phase) and logs."""

    proc: subprocess.Popen
    results: Path
    marker: Path
    log: Path

    def infos(self) -> list[dict]:
        return [json.loads(line) for line in self.results.read_text().splitlines()] if self.results.exists() else []


def _spawn(tmp: Path, tag: str, root: Path, overrides: list[str], stop: tuple[str, int] | None) -> _Worker:
    script = tmp / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = _Worker(proc=None, results=tmp / f"{tag}.jsonl", marker=tmp / f"{tag}.stopped",  # type: ignore[arg-type]
                     log=tmp / f"{tag}.log")
    with open(worker.log, "wb") as log:
        worker.proc = subprocess.Popen([sys.executable, str(script), str(root), str(worker.results), str(worker.marker),
                                        json.dumps(overrides), json.dumps(list(stop) if stop else None)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    return worker


def _finish(worker: _Worker, timeout: float = 120) -> None:
    try:
        rc = worker.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        raise
    assert rc == 0, worker.log.read_text()[-3000:]


def _phase_key(cfg: Config, phase: str) -> str:
    return jobs.teacher_key(cfg.pipeline.name) if phase == "teacher" else _round_key(cfg, int(phase.split()[1]))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("extra, kills", [
    ([], [("round 2", 12)]),
    # Dropout on (teacher and students): killed in the teacher after a checkpoint, in round 1 BEFORE its
    # first in-round checkpoint (so the round restarts in a process that never trained the teacher), and
    # in round 2 after a checkpoint.
    (["model.dropout=0.1", "distill.dropout=0.1"], [("teacher", 15), ("round 1", 4), ("round 2", 12)]),
], ids=["smoke", "dropout-killed-three-times"])
def test_sigkill_mid_round_resumes_to_identical_weights(tmp_path: Path, extra: list[str],
                                                        kills: list[tuple[str, int]]) -> None:
    overrides = ["pipeline.name=kill", *KILL_OVERRIDES, *extra]
    cfg = load_config(preset="smoke", overrides=overrides)
    reference = _spawn(tmp_path, "reference", tmp_path / "ref", overrides, None)  # uninterrupted, in parallel
    root = tmp_path / "killed"
    store = CheckpointStore(str(root))
    saved_steps: list[int] = []
    workers: list[_Worker] = []
    for i, stop in enumerate([*kills, None]):
        worker = _spawn(tmp_path, f"run{i}", root, overrides, stop)
        workers.append(worker)
        if stop is None:
            _finish(worker)
            break
        deadline = time.monotonic() + 120
        while not worker.marker.exists():
            assert worker.proc.poll() is None, f"worker ended before {stop}: {worker.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"worker never reached {stop}"
            time.sleep(0.02)
        key = _phase_key(cfg, stop[0])
        step = _state_step(store, key)  # the in-round state the kill leaves behind (None: none yet)
        os.kill(worker.proc.pid, signal.SIGKILL)
        assert worker.proc.wait(timeout=30) == -signal.SIGKILL
        assert not store.is_complete(key), "the killed phase must not look complete"
        saved_steps.append(step or 0)
    _finish(reference)

    # Each rerun resumes the phase killed in the run before from its last in-round checkpoint.
    phases = ["teacher", *[f"round {i}" for i in range(1, len(cfg.distill.rounds()) + 1)]]
    for (phase, _), step, rerun in zip(kills, saved_steps, workers[1:]):
        info = next(d for d in rerun.infos() if d["key"] == _phase_key(cfg, phase))
        assert info["trained"] and info["resumed_from"] == step, (phase, info)
    assert saved_steps[-1] > 0, "the last kill must come after an in-round checkpoint"
    # The final rerun did not retrain what was complete before the last kill.
    last_killed = phases.index(kills[-1][0])
    final = {d["key"]: d for d in workers[-1].infos()}
    for phase in phases[:last_killed]:
        assert not final[_phase_key(cfg, phase)]["trained"], phase
    for phase in phases[last_killed + 1:]:
        assert final[_phase_key(cfg, phase)]["trained"] and final[_phase_key(cfg, phase)]["resumed_from"] == 0

    # Bit-identical to the uninterrupted run: every checkpoint, and the final student tensor by tensor.
    ref_store = CheckpointStore(str(tmp_path / "ref"))
    for phase in phases:
        key = _phase_key(cfg, phase)
        assert store.read_manifest(key)["sha256"] == ref_store.read_manifest(key)["sha256"], \
            f"{phase} differs from the uninterrupted run"
        assert _state_step(store, key) is None, "in-round state must be cleared once the checkpoint is published"
    got, _ = store.load_checkpoint(_phase_key(cfg, phases[-1]))
    want, _ = ref_store.load_checkpoint(_phase_key(cfg, phases[-1]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


# ----------------------------------------------------------------------------------------------
# Object store unavailable mid-round (moto S3 stopped, then restarted on the same port)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_object_store_down_mid_round_fails_clearly_then_rerun_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _fake_aws_env(monkeypatch, tmp_path)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _start_moto(port)
    try:
        bucket = f"pd-faults-{uuid.uuid4().hex[:10]}"
        _boto(endpoint).create_bucket(Bucket=bucket)
        options = {"client_kwargs": {"endpoint_url": endpoint},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}
        cfg = _cfg("s3down", f"storage.root=s3://{bucket}/store", f"storage.storage_options={json.dumps(options)}",
                   "distill.log_every=3")
        store = jobs.open_store(cfg)  # what the tasks use: 3 attempts, 0.5 s then 1 s backoff
        teacher = jobs.ensure_teacher(cfg, store)
        key = _round_key(cfg, 1)
        stopped: dict[str, Any] = {}

        def stop_store(event: Any) -> None:
            if event.step == 6 and not stopped:  # after the in-round checkpoint at update 5
                stopped["state_step"] = _state_step(store, key)
                server.stop()
                stopped["at"] = time.monotonic()

        caplog.set_level(logging.WARNING, logger="pd_core.store")
        with pytest.raises(StorageIOError) as err:
            jobs.run_round(cfg, store, round_index=1, teacher=teacher, on_progress=stop_store)
        waited = time.monotonic() - stopped["at"]
        message = _one_line(err.value)
        assert stopped["state_step"] == 5
        assert "unreachable" in message and store.uri(jobs.state_key(key)) in message, message
        assert waited < 30, f"the outage took {waited:.1f}s to surface"
        # dict.fromkeys: a record can reach caplog twice when Prefect's logging setup also attached
        # handlers to pd_core (depends on what ran before in the session); each retry's text is distinct.
        retries = list(dict.fromkeys(r.getMessage() for r in caplog.records if "transient storage error" in r.getMessage()))
        assert [m.rsplit(" ", 3)[1:] for m in retries[:2]] == [["1/2", "in", "0.50s"], ["2/2", "in", "1.00s"]], retries
        assert FAKE_SECRET not in message and FAKE_KEY_ID not in message

        # While the store is down nothing is mistaken for "not there, retrain": loads fail clearly too.
        with pytest.raises(StorageIOError, match="unreachable"):
            store.is_complete(teacher.key)
        with pytest.raises(StorageIOError, match="unreachable"):
            jobs.run_round(cfg, store, round_index=1, teacher=teacher)

        server = _start_moto(port)  # same port; moto keeps its buckets in-process across restarts
        assert store.is_complete(teacher.key), "the previous checkpoint must stay complete"
        assert not store.is_complete(key) and store.read_manifest(key) is None, "no partial round may be visible"
        assert _state_step(store, key) == 5
        for k in (teacher.key, key, jobs.state_key(key)):
            _assert_nothing_partial(store, k)

        again = jobs.run_round(cfg, store, round_index=1, teacher=teacher)
        assert again.trained and again.resumed_from == 5 and store.is_complete(key)
        assert _state_step(store, key) is None
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------
# MLflow unreachable while a round trains (jobs level; the whole-pipeline version is further down)


def test_mlflow_down_training_continues_and_calls_are_journaled(template: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from tasks.tracking import Tracker

    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}.items():  # the Tracker's defaults, restored after
        monkeypatch.setenv(name, value)
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    tracker = Tracker(tracking_uri=f"http://127.0.0.1:{_free_port()}", experiment="pd-faults",
                      journal_path=str(tmp_path / "journal.jsonl"))
    caplog.set_level(logging.WARNING, logger="tasks.tracking")
    spent = [0.0]  # seconds inside tracker calls: what the outage costs the training loop

    def timed(call: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            spent[0] += time.monotonic() - t0

    run_id = timed(tracker.start_run, run_name="round-02", params=flatten(cfg))
    assert run_id and run_id.startswith("pending-")
    info = jobs.run_round(cfg, store, round_index=2, teacher=student,
                          on_progress=lambda e: timed(tracker.log_metrics, run_id, {"train_loss": e.loss}, step=e.step))
    timed(tracker.set_tags, run_id, {"checkpoint_uri": info.uri, "checkpoint_sha256": info.sha256})
    timed(tracker.end_run, run_id)

    assert info.trained and store.is_complete(info.key), "training must go on and the checkpoint land"
    assert tracker.flush() == tracker.pending == 1 + 2 + 2  # start, 2 metric events, tags, end: nothing lost
    journal = [json.loads(line) for line in Path(tracker.journal_path).read_text().splitlines()]
    assert [e["op"] for e in journal] == ["start_run", "log_metrics", "log_metrics", "set_tags", "end_run"]
    assert journal[3]["payload"]["tags"]["checkpoint_uri"] == info.uri
    outage = [r.getMessage() for r in caplog.records if r.name == "tasks.tracking"]
    assert len(outage) == 1 and "unreachable" in outage[0] and tracker.journal_path in outage[0], outage
    assert "pending" in tracker.run_link(run_id)
    assert spent[0] < 20, f"the outage cost the training loop {spent[0]:.1f}s"


# ----------------------------------------------------------------------------------------------
# NaN loss


@pytest.mark.parametrize("how", ["injected", "diverging-lr"])
def test_nan_loss_stops_the_round_fast_and_keeps_the_last_good_student(template: Path, tmp_path: Path,
                                                                        how: str) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    before = store.read_manifest(student.key)
    key = _round_key(cfg, 2)
    run_cfg = cfg if how == "injected" else _cfg("faults", "distill.lr=1e12")
    fault = 7 if how == "injected" else None  # 0-based update index: the 8th update
    with pytest.raises(NonFiniteLossError) as err:
        jobs.run_round(run_cfg, store, round_index=2, teacher=student, fault_at_step=fault)
    message = _one_line(err.value)
    m = re.search(r"^round 2 \(4->2\): loss became (nan|inf|-inf) between steps (\d+) and (\d+);", message)
    assert m, message
    lo, hi = int(m.group(2)), int(m.group(3))
    if fault is not None:  # stopped at the first check after the NaN: within one log/checkpoint window
        assert lo <= fault + 1 <= hi and hi - (fault + 1) < cfg.distill.log_every, message
    assert not store.is_complete(key) and store.read_manifest(key) is None
    step = _state_step(store, key)
    assert step is None or step < lo, "a state with NaN weights must never be saved"
    if step is not None:
        tensors, _ = store.load_state(jobs.state_key(key))
        assert all(torch.isfinite(t).all() for n, t in tensors.items() if t.is_floating_point()), "state is not finite"
    # the previous student is untouched and still the latest good checkpoint
    assert store.is_complete(student.key) and store.read_manifest(student.key) == before
    model = jobs.load_model(store, student.key)
    assert all(torch.isfinite(p).all() for p in model.denoiser.net.parameters())
    _assert_nothing_partial(store, key)
    if how == "injected":  # without the fault, a rerun resumes from the last good state and completes
        again = jobs.run_round(cfg, store, round_index=2, teacher=student)
        assert again.trained and again.resumed_from == (step or 0) and store.is_complete(key)


def test_nan_is_never_retried_but_storage_io_is() -> None:
    from tasks.training import storage_error_only

    class _State:
        def __init__(self, err: BaseException) -> None:
            self.err = err

        def result(self) -> None:
            raise self.err

    def retried(err: BaseException) -> bool:
        return storage_error_only(None, None, _State(err))

    assert not retried(NonFiniteLossError("round 2 (4->2): loss became nan between steps 6 and 10"))
    assert not retried(ConfigError("distill.lr must be > 0"))
    assert not retried(jobs.PipelineMismatchError("trained with different settings"))
    assert not retried(StoreError("file:///s/pipelines/x/teacher: model-0123.safetensors is corrupt (sha256 ...)"))
    assert retried(StorageIOError("cannot write s3://b/x: EndpointConnectionError; the store is unreachable"))
    assert retried(ConnectionResetError("reset"))


# ----------------------------------------------------------------------------------------------
# Bad checkpoints and reruns at the jobs level (tampering itself is covered in test_store.py)


def test_checkpoint_with_wrong_shapes_is_refused_clearly(template: Path, tmp_path: Path) -> None:
    import dataclasses

    from pd_core.train import copy_weights
    from pd_core.unet import UNet, spec_from_dict

    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    manifest = store.read_manifest(student.key)
    wider = UNet(dataclasses.replace(spec_from_dict(manifest["unet"]), ch=24, emb_ch=96))  # not what the manifest says
    kept = {k: v for k, v in manifest.items() if k not in ("format", "sha256", "files", "status", "created_at")}
    ref = store.save_checkpoint(student.key, tensors=copy_weights(wider.state_dict()), manifest=kept)
    altered = jobs.CheckpointInfo(**{**student.as_dict(), "sha256": ref.sha256})
    attempts = {
        "load": lambda: jobs.load_model(store, student.key),
        "round": lambda: jobs.run_round(cfg, store, round_index=2, teacher=altered),
        "import": lambda: jobs.ensure_teacher(_cfg("other", f"pipeline.teacher_uri={student.uri}"), store),
    }
    for what, attempt in attempts.items():
        with pytest.raises(StoreError) as err:
            attempt()
        message = _one_line(err.value)
        assert re.search(r"weights do not fit the architecture in its manifest \(\S+ has shape \[", message), \
            (what, message)
        assert student.uri in message, (what, message)
    assert not store.exists(_round_key(cfg, 2)) and not store.exists(jobs.state_key(_round_key(cfg, 2)))
    assert not store.exists(jobs.teacher_key("other")), "a misfit teacher must not be imported"


def test_rerun_with_other_training_settings_is_refused(template: Path, tmp_path: Path) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    changed = _cfg("faults", "distill.lr=1e-3")
    with pytest.raises(jobs.PipelineMismatchError) as err:
        jobs.ensure_teacher(changed, store)
    message = _one_line(err.value)
    assert store.uri(jobs.teacher_key("faults")) in message and "--name" in message, message
    with pytest.raises(jobs.PipelineMismatchError):
        jobs.run_round(changed, store, round_index=1, teacher=jobs.ensure_teacher(cfg, store))
    assert store.read_manifest(student.key)["sha256"] == student.sha256


# ----------------------------------------------------------------------------------------------
# Disk full / permission denied while a round saves (local store)


def _fail_writes(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, error: OSError, *, folder: str,
                 prefix: str) -> list[str]:
    """Make the local filesystem's open() for writing raise ``error`` for ``prefix`` files under ``folder``."""
    original = store.fs.open
    hits: list[str] = []

    def failing_open(path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        name = posixpath.basename(str(path))
        if any(m in mode for m in "wa") and str(path).startswith(folder) and re.match(rf"\.tmp-[0-9a-f]{{32}}-{prefix}",
                                                                                      name):
            hits.append(str(path))
            raise error
        return original(path, mode, *args, **kwargs)

    monkeypatch.setattr(store.fs, "open", failing_open)
    return hits


@pytest.mark.parametrize("error, prefix, hint", [
    (OSError(errno.ENOSPC, "No space left on device"), "model-", "disk is full"),  # the round's final save
    (PermissionError(errno.EACCES, "Permission denied"), "state-", "may not access it"),  # first in-round save
], ids=["disk-full-on-final-save", "permission-denied-on-state-save"])
def test_disk_full_or_permission_denied_during_a_round(template: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, error: OSError, prefix: str,
                                                        hint: str) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    before = {k: store.read_manifest(k) for k in (jobs.teacher_key("faults"), student.key)}
    key = _round_key(cfg, 2)
    folder = store._path(key)  # noqa: SLF001 - the round's folder and its .state sibling
    hits = _fail_writes(store, monkeypatch, error, folder=folder, prefix=prefix)
    with pytest.raises(StorageIOError, match=hint) as err:
        jobs.run_round(cfg, store, round_index=2, teacher=student)
    message = _one_line(err.value)
    assert err.value.__cause__ is error and len(hits) == 1, hits  # not retried: a full disk does not heal by itself
    assert store.uri(key) in message
    monkeypatch.undo()

    assert not store.is_complete(key) and store.read_manifest(key) is None
    for k in (key, jobs.state_key(key)):
        _assert_nothing_partial(store, k)
        assert not [n for n in _names(store, k) if n.startswith(".tmp-")], "temporary files left behind"
    for k, manifest in before.items():  # everything earlier is intact
        assert store.is_complete(k) and store.read_manifest(k) == manifest
    step = _state_step(store, key)
    # disk full at the end: the last in-round state (update 15) survives; denied at update 5: no state yet
    assert step == (15 if prefix == "model-" else None)
    again = jobs.run_round(cfg, store, round_index=2, teacher=student)  # space freed / permission fixed
    assert again.trained and again.resumed_from == (step or 0) and store.is_complete(key)


# ----------------------------------------------------------------------------------------------
# CLI bad input (in-process flows.cli.main): exit 2, one line on stderr, no traceback


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    home = tmp_path_factory.mktemp("cli-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PD_HOME", str(home))
        mp.setenv("PREFECT_HOME", str(home / "prefect"))
        hygiene = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "pd_core"}
        for name, value in hygiene.items():
            mp.setenv(name, value)  # prepare_environment's setdefaults, undone after the module
        mp.delenv("PD_STORAGE", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PD_DEBUG", raising=False)
        yield


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse --help / version: not an error path
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


FIELDS = sorted(flatten(load_config(preset="smoke")))
_keys = st.one_of(st.sampled_from(FIELDS),
                  st.sampled_from(["model.chh", "distill", "model", "nosuch.field", "teacher.updates.x", "Distill.lr",
                                   "storage.storage_options.key", "storage.storage_options.secret_access_key"]),
                  st.text(max_size=12))
_values = st.one_of(st.sampled_from(["-1", "0", "1", "1.5", "nan", ".inf", "-.inf", "1e999", "null", "true", "[]",
                                     "[1,", "{a: 1}", "{", "'", "!!python/object:os.system", "&a [*a]", "0x10", "1_000",
                                     "s3://AKIA:pw@bucket/x", "\x00", "é", "a\nb"]),
                    st.text(max_size=12))
_items = st.one_of(st.builds(lambda k, v: f"{k}={v}", _keys, _values), st.text(max_size=24))
_option = st.one_of(
    st.tuples(st.sampled_from(["--set"]), _items),
    st.tuples(st.sampled_from(["--preset"]), st.one_of(st.sampled_from(["smoke", "smok", "../smoke", "", "fmnist-cpu"]),
                                                         st.text(max_size=10))),
    st.tuples(st.sampled_from(["--name"]), st.one_of(st.sampled_from(["ok-name", "../up", "a/b", "x" * 101, " "]),
                                                       st.text(max_size=12))),
    st.tuples(st.sampled_from(["--storage"]), st.sampled_from(["s3://AKIAX:secret@bucket/p", "   ", "relative/store"])),
    st.tuples(st.sampled_from(["--tracking-uri"]), st.sampled_from(["http://u:pw@mlflow:5000", "postgresql://a:b@db/m",
                                                                    "sqlite:///x.db"])),
    st.tuples(st.sampled_from(["--config"]), st.sampled_from(["/nonexistent/pd.yaml", "memory://pd-no-such.yaml"])),
    st.tuples(st.sampled_from(["--bogus", "-x", "--set", "--name"]), st.sampled_from(["-q", "--set", "1", "--bogus"])),
)
_argv = st.lists(_option, min_size=1, max_size=3).map(lambda opts: [a for opt in opts for a in opt])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=_argv)
def test_cli_bad_input_exits_2_with_one_line(cli_env: None, argv: list[str]) -> None:
    assume(not {"-h", "--help"} & set(argv))  # help is not an error
    rc, out, err = _cli(["config", *argv])
    assert "Traceback" not in err and "Traceback" not in out
    if rc == 0:  # valid after all: the resolved config is printed and reloads
        assert err == "" and isinstance(yaml.safe_load(out), dict)
        return
    assert rc == 2, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and out == "", err
    for password in ("AKIAX:secret", "u:pw@mlflow", "a:b@db"):  # URL passwords are refused, never echoed
        assert password not in err
    # `pd run` refuses exactly the same input, with the same line, before starting anything
    rc_run, out_run, err_run = _cli(["run", *argv])
    assert (rc_run, out_run, err_run.replace("pd run", "pd config")) == (2, "", err)


KNOWN_FIELD = re.compile("|".join(re.escape(f) for f in sorted({*FIELDS, *[f.split(".")[0] for f in FIELDS]},
                                                                 key=len, reverse=True)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(FIELDS), value=_values)
def test_cli_bad_value_names_the_field(cli_env: None, key: str, value: str) -> None:
    rc, out, err = _cli(["config", "--set", f"{key}={value}"])
    assert rc in (0, 2) and "Traceback" not in err
    if rc == 2:
        line = err.strip()
        assert "\n" not in line and line.startswith("error: ")
        assert key in line or KNOWN_FIELD.search(line) or "YAML" in line, line  # names a field (or the YAML problem)


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


@dataclass
class S3Run:
    first: _Proc
    second: _Proc
    bucket: str
    endpoint: str
    lease_doc: dict
    keys_before_second: list[str]
    keys_after_second: list[str]


@pytest.fixture(scope="module")
def s3_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Run]:
    """`pd run` on moto S3 with fake credentials; frozen after taking its lease while a second `pd run` tries."""
    tmp = tmp_path_factory.mktemp("s3-pipeline")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _start_moto(port)
    try:
        s3 = _boto(endpoint)
        bucket = f"pd-sec-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        aws = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-creds")}
        args = ["run", "--preset", "smoke", "--name", "sec", "--storage", f"s3://{bucket}/store",
                *_set_args([f"storage.storage_options={{client_kwargs: {{endpoint_url: '{endpoint}'}}}}",
                            "tracking.registered_model=pd-faults-sec", *PIPELINE_FAST])]
        lease_key = "store/pipelines/sec/lease/lease.json"

        def keys() -> list[str]:
            return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))

        first = _pd(tmp / "home-a", args, _pd_env(tmp / "home-a", **aws))
        _wait_for(lambda: lease_key in keys(), first, timeout=180, what="lease")
        os.kill(first.proc.pid, signal.SIGSTOP)  # alive and holding the lease, doing nothing
        try:
            lease_doc = json.loads(s3.get_object(Bucket=bucket, Key=lease_key)["Body"].read())
            before = keys()
            second = _pd(tmp / "home-b", args, _pd_env(tmp / "home-b", **aws))
            second.wait(timeout=180)
            after = keys()
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        first.wait(timeout=300)
        yield S3Run(first=first, second=second, bucket=bucket, endpoint=endpoint, lease_doc=lease_doc,
                    keys_before_second=before, keys_after_second=after)
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_second_pipeline_run_with_the_same_name_is_refused(s3_pipeline: S3Run) -> None:
    run = s3_pipeline
    assert run.second.rc == 1, run.second.err()[-3000:]
    error_lines = [line for line in run.second.err().splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, run.second.err()[-3000:]
    owner = run.lease_doc["owner"]
    assert owner.split(":")[1] == str(run.first.proc.pid) and run.lease_doc["pid"] == run.first.proc.pid
    assert f"is leased by {owner!r}" in error_lines[0] and str(run.first.proc.pid) in error_lines[0], error_lines[0]
    assert "another run with this name is active" in error_lines[0]
    assert run.keys_after_second == run.keys_before_second, "the refused run wrote to the store"
    # ... and the first run, unfrozen, finished normally and released its lease
    assert run.first.rc == 0, run.first.err()[-3000:]
    assert "pipeline sec finished" in run.first.out()
    assert not any(k.endswith("lease/lease.json") for k in _list_keys(run))


@pytest.mark.integration
def test_refused_run_prints_no_traceback(s3_pipeline: S3Run) -> None:
    """A run-time failure inside the flow: Prefect's console logs keep the message, not the traceback."""
    err = s3_pipeline.second.err()
    assert "Traceback" not in err and 'File "' not in err, err[-2000:]


def _list_keys(run: S3Run) -> list[str]:
    s3 = _boto(run.endpoint)
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=run.bucket).get("Contents", []))


def _secret_forms() -> list[bytes]:
    forms = set()
    for secret in (FAKE_KEY_ID, FAKE_SECRET):
        forms |= {secret, quote(secret, safe=""), quote(secret, safe="/"), json.dumps(secret)[1:-1]}
    return sorted(f.encode() for f in forms)


def _scan(blobs: dict[str, bytes]) -> list[str]:
    return [f"{name}: {form.decode()}" for name, data in blobs.items() for form in _secret_forms() if form in data]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_credentials_never_reach_mlflow_prefect_logs_store_or_output(s3_pipeline: S3Run) -> None:
    run = s3_pipeline
    assert run.first.rc == 0, run.first.err()[-3000:]
    blobs: dict[str, bytes] = {}
    for home in (run.first.home, run.second.home):
        for path in home.rglob("*"):
            if path.is_file():
                blobs[str(path)] = path.read_bytes()
    for proc in (run.first, run.second):
        blobs[str(proc.stdout)] = proc.stdout.read_bytes()
        blobs[str(proc.stderr)] = proc.stderr.read_bytes()
    s3 = _boto(run.endpoint)
    for key in _list_keys(run):
        blobs[f"s3://{run.bucket}/{key}"] = s3.get_object(Bucket=run.bucket, Key=key)["Body"].read()

    # The scan looks at the real stores: Prefect's DB holds the run's logs, MLflow's the params, artifacts exist.
    home = run.first.home
    prefect_db = b"".join(blobs.get(str(home / "prefect" / f"prefect.db{s}"), b"") for s in ("", "-wal"))
    assert b"teacher saved to s3://" in prefect_db, "Prefect's DB does not hold the run's logs: wrong place scanned"
    mlflow_db = blobs[str(home / "mlflow.db")]
    assert f"s3://{run.bucket}/store".encode() in mlflow_db
    artifacts = [p for p in (home / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in artifacts) and any(p.suffix == ".safetensors" for p in artifacts)
    assert any(k.endswith("manifest.json") for k in blobs if k.startswith("s3://"))
    assert _scan({"control": f"x {quote(FAKE_SECRET, safe='')} y".encode()}), "the scanner itself is broken"

    leaks = _scan(blobs)
    assert not leaks, f"credentials found: {leaks}"


LEASE_TTL_S = 2.0  # the pipeline's lease TTL in the MLflow-down run: renewal must keep it alive for the whole run


@dataclass
class LocalRun:
    proc: _Proc
    store: CheckpointStore
    lapsed: list[tuple[float, float]]  # (time read, expires_at_unix) of pipeline leases read after their expiry
    taken_over: list[float]  # times another owner took the pipeline's expired lease
    refused: int  # attempts by another owner refused while the pipeline held its lease
    held: list[tuple[float, float]]  # (s after start, expires_at_unix) of each read of the pipeline's lease
    seconds: float


@pytest.fixture(scope="module")
def mlflow_down_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRun]:
    """`pd run` with MLflow at a dead address; lease TTL cut to 2 s while another owner keeps trying to take it."""
    tmp = tmp_path_factory.mktemp("mlflow-down")
    root = tmp / "store"
    args = ["run", "--preset", "smoke", "--name", "down", "--storage", str(root),
            "--tracking-uri", f"http://127.0.0.1:{_free_port()}",
            # a longer teacher than PIPELINE_FAST's: the run must outlast several lease TTLs (it took 3.5 s
            # once the once-per-process work moved into the server's start-up window)
            *_set_args([*PIPELINE_FAST, "teacher.updates=100"])]
    started = time.monotonic()
    proc = _pd(tmp / "home", args, _pd_env(tmp / "home"),
               prelude=f"import flows.pipeline\nflows.pipeline.LEASE_TTL_S = {LEASE_TTL_S}\n")
    store = CheckpointStore(str(root), retry_base_delay=0.01)
    lease_key = "pipelines/down/lease"
    lease_file = root / lease_key / "lease.json"
    lapsed: list[tuple[float, float]] = []
    taken_over: list[float] = []
    refused = 0
    held: list[tuple[float, float]] = []
    while proc.proc.poll() is None and time.monotonic() - started < 300:
        try:
            doc = json.loads(lease_file.read_text())  # written by rename: never torn; absent once released
        except (FileNotFoundError, json.JSONDecodeError):
            doc = None
        now = time.time()
        if doc is not None and doc.get("owner") != "intruder":
            held.append((time.monotonic() - started, doc["expires_at_unix"]))
            if doc["expires_at_unix"] <= now:
                lapsed.append((now, doc["expires_at_unix"]))
            try:
                with store.acquire_lease(lease_key, owner="intruder", ttl_s=30):
                    if doc["expires_at_unix"] <= now:  # else the pipeline released it in between: not a takeover
                        taken_over.append(time.monotonic() - started)
            except StoreError:  # LeaseHeldError: the pipeline holds it
                refused += 1
        time.sleep(0.25)
    proc.wait(timeout=60)
    yield LocalRun(proc=proc, store=store, lapsed=lapsed, taken_over=taken_over, refused=refused, held=held,
                   seconds=time.monotonic() - started)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_mlflow_down_pipeline_trains_everything_and_reports_the_gap(mlflow_down_pipeline: LocalRun) -> None:
    run = mlflow_down_pipeline
    assert run.proc.rc == 0, run.proc.err()[-3000:]
    assert "pipeline down finished" in run.proc.out()
    cfg = load_config(preset="smoke", overrides=["pipeline.name=down", *PIPELINE_FAST])
    keys = [jobs.teacher_key("down"), *[_round_key(cfg, i) for i in range(1, len(cfg.distill.rounds()) + 1)]]
    assert all(run.store.is_complete(k) for k in keys), "checkpoints must land while MLflow is down"
    journal = run.proc.home / "mlflow-journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    pending = re.search(r"MLflow: (\d+) tracking calls still pending in the journal", run.proc.err())
    assert pending and int(pending.group(1)) == len(entries) > 0, run.proc.err()[-3000:]
    # nothing of a round is silently lost: every checkpoint's URI waits in the journal for MLflow
    tagged = {e["payload"]["tags"].get("checkpoint_uri") for e in entries if e["op"] == "set_tags"}
    assert {run.store.uri(k) for k in keys} <= tagged
    assert {"start_run", "log_metrics", "end_run", "log_sampler_model"} <= {e["op"] for e in entries}
    assert "Traceback" not in run.proc.err()


@pytest.mark.integration
def test_pipeline_lease_is_kept_for_the_whole_run(mlflow_down_pipeline: LocalRun) -> None:
    """With a 2 s TTL and a run several times longer, only renewal keeps another owner out: never two writers."""
    run = mlflow_down_pipeline
    assert run.proc.rc == 0 and run.refused > 0, "the probe never saw the pipeline's lease"
    span = run.held[-1][0] - run.held[0][0]
    assert span > 2.5 * LEASE_TTL_S, f"the lease was seen for {span:.1f}s only: too short to need renewal"
    assert len({expires for _, expires in run.held}) >= 3, "the lease was never renewed"
    assert not run.lapsed, f"the pipeline's lease lapsed while it ran (read after expiry): {run.lapsed[:3]}"
    assert not run.taken_over, f"another owner took the lease {run.taken_over[:3]} s into the run"


@pytest.mark.integration
def test_mlflow_outage_is_one_warning_line_per_run(mlflow_down_pipeline: LocalRun) -> None:
    lines = [line for line in mlflow_down_pipeline.proc.err().splitlines()
             if ("unreachable" in line and "WARNING" in line) or "Retrying (Retry(" in line]
    assert len(lines) == 1, f"{len(lines)} lines about the outage, e.g. {lines[:3]}"


def test_a_lost_lease_stops_the_flow_before_its_next_task(tmp_path: Path) -> None:
    """The renewer finds the lease gone (expired and taken over, or removed): the flow's next check raises,
    so this run writes no further checkpoint while another run owns the pipeline."""
    from flows.pipeline import _kept_alive
    from pd_core.store import LeaseLostError

    store = CheckpointStore(str(tmp_path / "store"))
    with store.acquire_lease("pipelines/x/lease", owner="me", ttl_s=0.3) as lease, \
            _kept_alive(lease, logger=logging.getLogger("test")) as guard:
        guard.check()  # ours: nothing happens
        Path(lease.uri.removeprefix("file://")).unlink()  # what a takeover or an operator's cleanup does to us
        deadline = time.monotonic() + 10
        while guard.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(LeaseLostError, match="stops before its next task"):
            guard.check()
