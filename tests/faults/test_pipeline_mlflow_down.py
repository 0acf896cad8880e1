"""Whole ``pd run`` with MLflow unreachable (subprocesses, embedded Prefect), and the pipeline's lease.

- every checkpoint lands, the gap is reported, the outage is one warning line;
- the lease is renewed for the whole run, and a lost lease stops the flow before its next task.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pd_core import jobs
from pd_core.config import load_config
from pd_core.store import CheckpointStore, StoreError
from tests.faults.helpers import _free_port, _round_key
from tests.faults.pd_runs import PIPELINE_FAST, _pd, _pd_env, _Proc, _set_args

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
            # a longer teacher than PIPELINE_FAST's: the run must outlast several lease TTLs (with
            # PIPELINE_FAST's teacher it takes about 3.5 s)
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
    journals = list((Path(run.store._path("")) / ".mlflow-journals").glob("mlflow-journal-*.jsonl"))  # noqa: SLF001
    assert len(journals) == 1 and not (run.proc.home / "mlflow-journal.jsonl").exists(), journals
    entries = [json.loads(line) for line in journals[0].read_text().splitlines()]
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
