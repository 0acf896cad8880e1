"""A run SIGKILLed holding the pipeline's lease leaves RUNNING records; the next run ends them.

Real Prefect (the test harness' server) and MLflow (sqlite); the dead holder is a process that really
exited. The whole-pipeline version (``pd run`` killed, then rerun) is in
tests/pipeline/test_kill_resume.py.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pd_core.store import CheckpointStore
from pd_core.store.formats import utc_iso

pytestmark = pytest.mark.integration


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class _Lines(logging.Handler):
    """Collects the messages of one logger (Prefect's logging setup reroutes the root's handlers)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_next_run_marks_a_dead_runs_mlflow_runs_killed_and_its_flow_run_crashed(prefect_api: str,
                                                                                    tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from tasks.reconcile import FLOW_RUN_TAG, end_dead_run
    from tasks.tracking import Tracker

    @flow(name="pd-dead-run")
    def dead() -> None:
        """Stands for the pipeline flow of the killed process."""

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(dead, state=Running())
    flow_run_id = str(flow_run.id)
    tracker = Tracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="pd-dead")
    parent = tracker.start_run(run_name="dead", tags={"pd.pipeline": "dead", FLOW_RUN_TAG: flow_run_id})
    child = tracker.start_run(run_name="round-01-8to4", parent_run_id=parent)
    finished = tracker.start_run(run_name="teacher", parent_run_id=parent)
    tracker.end_run(finished)
    other = tracker.start_run(run_name="another pipeline", tags={FLOW_RUN_TAG: "9" * 8})

    # the killed process's lease: same host, a pid that no longer exists, not expired
    store = CheckpointStore(str(tmp_path / "store"))
    pid = _dead_pid()
    doc = {"owner": f"{socket.gethostname()}:{pid}:flow-run-{flow_run_id}", "host": socket.gethostname(),
           "pid": pid, "token": "0" * 32, "ttl_s": 900.0, "expires_at": utc_iso(time.time() + 900),
           "expires_at_unix": time.time() + 900, "renewed_at": utc_iso(time.time()),
           "meta": {"flow_run_id": flow_run_id}}
    store.put_bytes("pipelines/dead/lease/lease.json", json.dumps(doc).encode())

    lease = store.acquire_lease("pipelines/dead/lease", owner="next-run", ttl_s=60, meta={"flow_run_id": "x"})
    assert lease.taken_over is not None and lease.taken_over["pid"] == pid
    logger, seen = logging.getLogger("pd-test-reconcile"), _Lines()
    logger.addHandler(seen)
    end_dead_run(lease.taken_over, tracker=tracker, logger=logger, current_flow_run_id="x")

    client = tracker._ops.client  # noqa: SLF001 - read back what MLflow holds
    status = {name: client.get_run(run).info.status
              for name, run in [("parent", parent), ("child", child), ("finished", finished), ("other", other)]}
    assert status == {"parent": "KILLED", "child": "KILLED", "finished": "FINISHED", "other": "RUNNING"}, status
    with get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(flow_run.id).state
    assert state.type.value == "CRASHED" and "died" in (state.message or ""), state
    assert len(seen.lines) == 1 and "died without ending: 2 MLflow run(s) marked KILLED" in seen.lines[0]
    assert "Prefect flow run marked CRASHED" in seen.lines[0] and f"pid {pid}" in seen.lines[0], seen.lines

    # records already final (a second takeover): nothing changes, and the line says so
    end_dead_run(lease.taken_over, tracker=tracker, logger=logger, current_flow_run_id="x")
    assert "0 MLflow run(s)" in seen.lines[-1] and "left as it is" in seen.lines[-1], seen.lines
    logger.removeHandler(seen)
    lease.release()
