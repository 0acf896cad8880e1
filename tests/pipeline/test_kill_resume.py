"""A ``pd run`` killed mid-round, rerun: it resumes in the round it was killed in.

Same setting as test_smoke_run.py (real Prefect, MLflow on sqlite, moto S3), with its own, shortened pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import MotoS3
from tests.pipeline.helpers import (
    as_plain_data,
    children_of,
    mlflow_client,
    open_store,
    parent_of,
    pd_command,
    write_storage_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


class LeaseWatcher:
    """Reads a lease file every 0.2 s in a thread while in use; ``seen`` = [(unix time read, lease doc)]."""

    def __init__(self, store, path: str) -> None:
        self.store, self.path = store, path
        self.seen: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                doc = json.loads(self.store.get_bytes(self.path))
            except Exception:  # noqa: BLE001, S112 - absent between runs, or mid-write: read again on the next tick
                continue
            self.seen.append((time.time(), doc))

    def __enter__(self) -> LeaseWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


KILL_NAME = "killtest"
# Round 1 (8->4) is short; round 2 (4->2, a "last round") is long enough to be killed in; no eval.
KILL_OVERRIDES = ["teacher.updates=30", "distill.final_steps=2", "distill.updates_per_round=10",
                  "distill.last_rounds_updates=40", "distill.checkpoint_every=10", "eval.enabled=false"]


def test_killed_run_resumes_in_the_round_it_was_killed_in(moto_server: MotoS3, prefect_api: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pd_core.jobs import round_key, state_key

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PD_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bucket = moto_server.make_bucket(None)
    root = f"s3://{bucket}/kill"
    config_path = write_storage_config(tmp_path / "storage.yaml", root=root, moto=moto_server)
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    store = open_store(root, moto_server)
    round1 = round_key(KILL_NAME, round_index=1, student_steps=4)
    round2 = round_key(KILL_NAME, round_index=2, student_steps=2)
    state2 = f"{state_key(round2)}/state.json"

    args = ["run", "--preset", "smoke", "--name", KILL_NAME, "--config", str(config_path), "--tracking-uri",
            tracking_uri, *[a for o in KILL_OVERRIDES for a in ("--set", o)]]
    log_path = tmp_path / "killed-run.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}  # the harness' server: no ephemeral server to start
    env.pop("PD_DEBUG", None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([*pd_command(), *args], cwd=tmp_path, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while not store.exists(state2):
                assert proc.poll() is None, f"pd run exited ({proc.returncode}) before round 2 saved its state:\n" \
                                            f"{log_path.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "round 2 never saved an in-round state"
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, mid-round: no cleanup runs
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()  # reaped: a zombie would still look alive to the lease's dead-holder check
    assert proc.returncode == -signal.SIGKILL

    # What the kill left behind: a complete round 1, round 2's in-round state, a lease of a dead process.
    assert store.is_complete(round1)
    assert not store.is_complete(round2), "round 2 finished before the kill; raise distill.last_rounds_updates"
    round1_sha = store.read_manifest(round1)["sha256"]
    saved = store.load_state(state_key(round2))
    assert saved is not None
    killed_at = int(saved[1]["step"])
    assert 10 <= killed_at < 40
    lease = json.loads(store.get_bytes(f"pipelines/{KILL_NAME}/lease/lease.json"))
    assert lease["pid"] == proc.pid  # never released: the rerun must take it over, not wait out its TTL

    # Rerun (in this process, same config): skips teacher and round 1, continues round 2 where it stopped.
    # Its lease is renewed every 0.2 s here (TTL 60 s: only a stalled renewer, not a loaded machine, lets it lapse);
    # a watcher checks the flow keeps renewing it while it runs.
    import flows.pipeline
    from flows.pipeline import distillation_pipeline

    monkeypatch.setattr(flows.pipeline, "LEASE_TTL_S", 60.0)
    monkeypatch.setattr(flows.pipeline, "LEASE_RENEW_S", 0.2)
    watcher = LeaseWatcher(open_store(root, moto_server), f"pipelines/{KILL_NAME}/lease/lease.json")
    t0 = time.perf_counter()
    with watcher:
        result = as_plain_data(distillation_pipeline(preset="smoke", overrides=list(KILL_OVERRIDES), name=KILL_NAME,
                                                     config_path=str(config_path), tracking_uri=tracking_uri))
    seconds = time.perf_counter() - t0
    print(f"\nresumed run: {seconds:.1f}s (killed at round 2 update {killed_at})")
    ours = [(t, doc) for t, doc in watcher.seen if doc["pid"] == os.getpid()]
    assert ours, "the rerun never held the pipeline lease"
    expired = [(round(t, 2), doc["expires_at_unix"]) for t, doc in ours if doc["expires_at_unix"] <= t]
    assert not expired, f"the pipeline lease lapsed while the flow ran (not renewed): {expired[:3]}"
    expiries = [doc["expires_at_unix"] for _, doc in ours]
    assert len(set(expiries)) >= 2 and expiries == sorted(expiries), "renewed while the flow ran, never moved back"
    teacher, rounds = result["teacher"], result["rounds"]
    assert teacher["trained"] is False
    assert [(r["round"], r["trained"]) for r in rounds] == [(1, False), (2, True)]
    assert rounds[0]["sha256"] == round1_sha, "a completed round was retrained"
    assert rounds[1]["resumed_from"] == killed_at
    assert store.is_complete(round2) and not store.exists(state2)
    assert not store.exists(f"pipelines/{KILL_NAME}/lease/lease.json")  # released at the end of the rerun

    # MLflow: the rerun's round-2 run says where it resumed, and its loss curve starts after that update.
    client = mlflow_client(tracking_uri)
    children = children_of(client, parent_of(client, rounds[1]["mlflow_run_id"]))
    run2 = children[f"{KILL_NAME}/round-02-4to2"]
    assert run2.data.metrics["resumed_from"] == killed_at
    steps = [m.step for m in client.get_metric_history(run2.info.run_id, "train_loss")]
    assert steps and min(steps) > killed_at and max(steps) == 40
    assert children[f"{KILL_NAME}/round-01-8to4"].data.tags["skipped"] == "true"
    assert not client.get_metric_history(children[f"{KILL_NAME}/round-01-8to4"].info.run_id, "train_loss")

    # The killed run's records are ended by the rerun that took its lease, not left RUNNING forever: its MLflow
    # parent run and the round it was in are KILLED, its Prefect flow run CRASHED.
    killed_flow_run = lease["meta"]["flow_run_id"]
    experiment = run2.info.experiment_id
    killed_parents = client.search_runs([experiment], filter_string=f"tags.`prefect.flow_run_id` = '{killed_flow_run}'")
    assert len(killed_parents) == 1 and killed_parents[0].info.status == "KILLED", killed_parents
    killed_children = children_of(client, killed_parents[0].info.run_id)
    assert killed_children[f"{KILL_NAME}/round-02-4to2"].info.status == "KILLED"
    assert {r.info.status for r in killed_children.values()} <= {"FINISHED", "KILLED"}, killed_children
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(killed_flow_run).state.type.value == "CRASHED"
