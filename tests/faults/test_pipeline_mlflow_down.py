"""Whole ``pd run`` with MLflow unreachable (subprocesses, embedded Prefect), and the pipeline's lease.

- every checkpoint lands, the gap is reported, the outage is one warning line;
- the lease is renewed for the whole run, and a lost lease stops the flow before its next task.

No verdict here depends on how fast the machine is: the run's lease is renewed every 0.2 s under a 60 s TTL (a
renewal late by a minute is a hang, not load), and the renewer itself is driven by events, not by sleeps.
"""

from __future__ import annotations

import json
import logging
import re
import threading
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

# The MLflow-down run's lease: renewed every LEASE_RENEW_S, many times in a run of a few seconds; a renewal late by
# the TTL (a stalled renewer, not a loaded machine) would show as a lapse or a takeover.
LEASE_TTL_S = 60.0
LEASE_RENEW_S = 0.2


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
    """`pd run` with MLflow at a dead address; its lease renewed every 0.2 s while another owner tries to take it."""
    tmp = tmp_path_factory.mktemp("mlflow-down")
    root = tmp / "store"
    args = ["run", "--preset", "smoke", "--name", "down", "--storage", str(root),
            "--tracking-uri", f"http://127.0.0.1:{_free_port()}",
            # a longer teacher than PIPELINE_FAST's (with which the run takes about 3.5 s): many renewals
            *_set_args([*PIPELINE_FAST, "teacher.updates=100"])]
    started = time.monotonic()
    proc = _pd(tmp / "home", args, _pd_env(tmp / "home"),
               prelude=f"import flows.pipeline\nflows.pipeline.LEASE_TTL_S = {LEASE_TTL_S}\n"
                       f"flows.pipeline.LEASE_RENEW_S = {LEASE_RENEW_S}\n")
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
    """The flow renews its lease again and again while it runs, and another owner never gets it: never two writers.
    (That a renewal carries a lease past its first TTL: store/test_leases.py::test_renew_extends_the_lease.)"""
    run = mlflow_down_pipeline
    assert run.proc.rc == 0 and run.refused > 0, "the probe never saw the pipeline's lease"
    expiries = [expires for _, expires in run.held]
    assert len(set(expiries)) >= 3, "the lease was never renewed while the flow ran"
    assert expiries == sorted(expiries), "a renewal moved the lease's expiry back"
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
    with store.acquire_lease("pipelines/x/lease", owner="me", ttl_s=60) as lease, \
            _kept_alive(lease, logger=logging.getLogger("test"), every_s=0.01) as guard:
        guard.check()  # ours: nothing happens
        Path(lease.uri.removeprefix("file://")).unlink()  # what a takeover or an operator's cleanup does to us
        deadline = time.monotonic() + 60  # a hang bound: the loop ends at the renewer's next look
        while guard.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(LeaseLostError, match="stops before its next task"):
            guard.check()


def test_the_renewer_renews_until_the_body_ends_and_outlasts_a_storage_hiccup(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Counted renewals, not timed ones: each is observed as it happens; one failing with a StoreError is a warning
    and the next one is tried; none runs after the body (the renewer is joined before the lease is released)."""
    from flows.pipeline import _kept_alive

    store = CheckpointStore(str(tmp_path / "store"))
    lease = store.acquire_lease("pipelines/x/lease", owner="me", ttl_s=60)
    real_renew, calls, renewed = lease.renew, [], threading.Event()

    def renew(**kwargs) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise StoreError("the store did not answer")  # a storage hiccup: the TTL leaves room for the next try
        real_renew(**kwargs)
        if len(calls) >= 4:
            renewed.set()

    lease.renew = renew
    caplog.set_level(logging.WARNING, logger="test")
    with lease, _kept_alive(lease, logger=logging.getLogger("test"), every_s=0.01) as guard:
        assert renewed.wait(60), f"the renewer stopped after {len(calls)} renewals"  # a hang bound
        guard.check()  # the hiccup did not cost the lease
        on_disk = json.loads(Path(lease.uri.removeprefix("file://")).read_text())
        assert on_disk["token"] == lease.token
    assert set(calls) == {"pd-lease-renewer"} and len(calls) >= 4
    assert "pd-lease-renewer" not in {t.name for t in threading.enumerate()}  # joined: no renewal after the body
    assert not Path(lease.uri.removeprefix("file://")).exists()  # then released
    assert [r.getMessage() for r in caplog.records if r.name == "test"] == \
        ["could not renew the pipeline lease (will retry): the store did not answer"]


def test_the_flow_renews_its_lease_well_inside_the_ttl_and_refuses_a_renewal_slower_than_it(tmp_path: Path) -> None:
    import flows.pipeline
    from flows.pipeline import _kept_alive

    assert 0 < flows.pipeline.LEASE_RENEW_S <= flows.pipeline.LEASE_TTL_S / 3
    with CheckpointStore(str(tmp_path / "store")).acquire_lease("k", owner="me", ttl_s=60) as lease, \
            pytest.raises(ValueError, match="every_s must be between 0 and the lease's TTL"):
        with _kept_alive(lease, logger=logging.getLogger("test"), every_s=60):
            pass
