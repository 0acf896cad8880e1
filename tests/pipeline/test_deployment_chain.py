"""The teacher flow followed by the distillation its event triggers makes ONE MLflow parent run.

The chain as the server runs it, minus the worker: the teacher flow runs against a real Prefect server
(the test harness) and emits ``pd.teacher.completed``; the event is read back from the server; the
``pd-distill`` trigger's parameters (deployments/prefect.yaml) are rendered from it exactly as the
server renders them; the distillation flow runs with those parameters. (tests/test_fullstack.py runs
the same chain through a worker and the real automation.)
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.pipeline.helpers import mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

NAME = f"chain-{uuid.uuid4().hex[:6]}"
FAST = ["runtime.threads=1", "teacher.updates=40", "teacher.log_every=10", "teacher.checkpoint_every=20",
        "distill.updates_per_round=10", "distill.log_every=5", "distill.checkpoint_every=5",
        "eval.num_samples=100", "eval.batch_size=100", "eval.kid_subset_size=50", "eval.classifier_epochs=1",
        "eval.stochastic_gammas=[]"]


def _teacher_event(prefect, flow_run_id: str) -> dict:
    """The pd.teacher.completed event of this flow run, as the server stored it (persisted asynchronously)."""
    query = {"filter": {"event": {"name": ["pd.teacher.completed"]}, "any_resource": {"id": [f"pd.pipeline.{NAME}"]},
                        "related": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 5}
    deadline = time.monotonic() + 60
    while True:
        events = prefect.request("POST", "/events/filter", json=query).json()["events"]
        if events or time.monotonic() > deadline:
            assert events, "the teacher flow's pd.teacher.completed event never reached the server"
            return events[0]
        time.sleep(0.5)


def _trigger_parameters(event: dict) -> dict:
    """pd-distill's trigger parameters rendered against ``event``, as the Prefect server renders them."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    from deployments import deploy

    plan = deploy.plan(deploy.load_spec(deploy.SPEC_PATH), deploy.parse_args(["--gpus", "0"]))
    (trigger,) = next(d for d in plan if d["name"] == "pd-distill")["triggers"]
    params = copy.deepcopy(trigger["parameters"])
    RunDeployment._upgrade_v1_templates(params)
    received = ReceivedEvent.model_validate(event)
    return hydrate(params, HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": received}))


def test_teacher_flow_and_the_triggered_distillation_share_one_mlflow_parent(
        prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client

    from flows.pipeline import distillation_pipeline
    from flows.teacher import train_teacher_flow

    monkeypatch.setenv("PD_HOME", str(tmp_path / "home"))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    teacher_state = train_teacher_flow(preset="smoke", name=NAME, overrides=FAST, storage=str(tmp_path / "store"),
                                       tracking_uri=tracking_uri, return_state=True)
    teacher_flow_run_id = str(teacher_state.state_details.flow_run_id)
    with get_client(sync_client=True) as prefect:
        event = _teacher_event(prefect, teacher_flow_run_id)
        teacher_run = prefect.read_flow_run(teacher_flow_run_id)
    assert re.fullmatch(rf"{NAME}-teacher-\d{{4}}-\d\d-\d\dT\d\d-\d\d", teacher_run.name), teacher_run.name
    assert {f"pipeline:{NAME}", "preset:smoke"} <= set(teacher_run.tags)

    params = _trigger_parameters(event)
    assert params["mlflow_parent_run_id"] == event["payload"]["mlflow_parent_run_id"]
    distill_state = distillation_pipeline(**params, return_state=True)
    assert distill_state.is_completed(), distill_state

    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name("progressive-distillation")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`pd.pipeline` = '{NAME}'")
    parents = [r for r in runs if r.data.tags.get("pd.kind") == "pipeline"]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags.get("pd.kind")) for r in runs]
    (parent,) = parents
    assert parent.info.run_id == params["mlflow_parent_run_id"]
    assert parent.info.run_name == NAME and parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.teacher_flow_run_id"] == teacher_flow_run_id
    assert parent.data.tags["prefect.flow_run_id"] == str(distill_state.state_details.flow_run_id)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted([f"{NAME}/teacher", *(f"{NAME}/round-{i:02d}-{t}to{t // 2}"
                                                            for i, t in enumerate((8, 4, 2), start=1))])
    teacher = children[f"{NAME}/teacher"]
    # Trained by the teacher flow, found complete by the distillation: still recorded as trained.
    assert teacher.data.tags["skipped"] == "false"
    assert client.get_metric_history(teacher.info.run_id, "train_loss")
    assert "distilled_fd_digits_1steps" in parent.data.metrics
