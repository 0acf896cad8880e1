"""A cancelled (or crashed) sweep ends its children still going, on a real Prefect API (the test harness).

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
