"""A worker SIGKILLed mid-round resumes to bit-identical weights (pd_core.jobs in subprocesses, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pd_core import jobs
from pd_core.config import Config, load_config
from pd_core.store import CheckpointStore
from tests.faults.helpers import REPO, _round_key, _state_step

WORKER = r'''
import dataclasses, json, os, signal, sys
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
        f.write(json.dumps(dataclasses.asdict(info)) + "\n")

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
@pytest.mark.timeout(1200)  # a hang bound above the waits inside (600 s per kill): a loaded machine trains slowly
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
        deadline = time.monotonic() + 600  # a hang bound: a loaded machine trains slowly
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
    for (phase, _), step, rerun in zip(kills, saved_steps, workers[1:], strict=True):
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
