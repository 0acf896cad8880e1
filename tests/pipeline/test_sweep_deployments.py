"""A sweep on a standing server, against a real Prefect API (the test harness): its points as deployment runs,
the teacher-training points first; a cancelled (or crashed) sweep ends its children still going.

Deployment runs a worker runs become Cancelling (the worker stops the process; Prefect's server itself
cancels one no worker has picked up yet), in-process runs Cancelled; finished
children and the children of other sweeps are left alone.
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = [pytest.mark.integration]


def test_cancel_children_ends_the_sweeps_active_children_and_nothing_else(prefect_api: str) -> None:
    from prefect import flow, get_client
    from prefect.states import Completed, Running, Scheduled

    from flows.sweep import cancel_children

    @flow(name="sweep-child-probe")
    def probe() -> None:
        return None

    parent, other = str(uuid.uuid4()), str(uuid.uuid4())
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("sweep-child-probe")
        deployment_id = client.create_deployment(flow_id=flow_id, name=f"probe-{parent[:8]}")
        running = client.create_flow_run(probe, tags=[f"sweep-run:{parent}"], state=Running())
        remote = client.create_flow_run_from_deployment(deployment_id, tags=[f"sweep-run:{parent}"],
                                                        state=Scheduled())
        client.set_flow_run_state(remote.id, Running(), force=True)  # a worker picked it up
        done = client.create_flow_run(probe, tags=[f"sweep-run:{parent}"], state=Completed())
        elsewhere = client.create_flow_run(probe, tags=[f"sweep-run:{other}"], state=Running())

        ended = cancel_children(parent)

        assert sorted(ended) == sorted([str(running.id), str(remote.id)])
        assert client.read_flow_run(running.id).state.type.value == "CANCELLED"
        assert client.read_flow_run(remote.id).state.type.value == "CANCELLING"  # the worker stops it
        assert client.read_flow_run(done.id).state.type.value == "COMPLETED"
        assert client.read_flow_run(elsewhere.id).state.type.value == "RUNNING"
        assert cancel_children(parent) == []  # nothing is ended twice


def test_points_run_as_deployment_runs_with_the_teacher_trainers_first(prefect_api: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployment path against the real API; this thread plays the worker (marks each run Completed)."""
    import logging
    import threading
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Completed

    from flows import sweep
    from flows.sweep_grid import SweepPoint

    monkeypatch.setattr(sweep, "POLL_S", 0.2)
    tag = f"sweep:probe{uuid.uuid4().hex[:8]}"
    points = [SweepPoint(name=n, values={"x.y": n}) for n in ("a", "b", "c", "d")]
    leaders = {"a": "a", "b": "a", "c": "c", "d": "c"}
    seen: list[tuple[str, dict]] = []
    stop = threading.Event()

    def worker() -> None:
        with get_client(sync_client=True) as api:
            while not stop.is_set():
                for run in api.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))):
                    if not run.state.is_final():
                        seen.append((run.parameters["name"], run.parameters))
                        api.set_flow_run_state(run.id, Completed(), force=True)
                time.sleep(0.1)

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("sweep-point-probe")
        client.create_deployment(flow_id=flow_id, name="probe")
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        outcomes = sweep._as_deployments(points, leaders, {"preset": "smoke", "storage": None}, ["eval.enabled=false"],
                                         tag.removeprefix("sweep:"), "sweep-point-probe/probe",
                                         logger=logging.getLogger("test"))
    finally:
        stop.set()
        thread.join()
    assert outcomes == {"a": True, "b": True, "c": True, "d": True}
    order = [name for name, _ in seen]
    assert sorted(order[:2]) == ["a", "c"] and sorted(order[2:]) == ["b", "d"]  # teachers first, then the rest
    params = dict(seen)
    assert params["a"]["shared_teacher"] is None and params["b"]["shared_teacher"] == "pipelines/a/teacher"
    assert params["d"]["overrides"] == ["eval.enabled=false", "x.y=d"] and params["d"]["preset"] == "smoke"
    assert params["d"]["sweep"] == {"pd.sweep": tag.removeprefix("sweep:"), "pd.sweep.x.y": "d"}
    assert "storage" not in params["a"]  # None: the worker's PD_STORAGE
