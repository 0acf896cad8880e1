"""Round notifications as Prefect's own automation (deployments/automation.py), on a real Prefect server: one
automation per server, matching every pipeline's `pd.round.completed`, whose notification Prefect's server
renders with its own template engine; the `pd-notify` flow (a flow run per round) only when asked for."""

from __future__ import annotations

import asyncio
import uuid

import pytest

pytestmark = pytest.mark.integration

PAYLOAD = {"round": 2, "teacher_steps": 8, "student_steps": 4, "checkpoint_uri": "s3://c/r2",
           "metrics": {"fd_digits": 12.3456, "sample_grid": "s3://c/r2.eval/g.png", "w": None}, "trained": True}


def _event(payload: dict):
    from prefect.server.events.schemas.events import ReceivedEvent

    return ReceivedEvent(id=uuid.uuid4(), occurred="2026-01-01T00:00:00Z", event="pd.round.completed",
                         resource={"prefect.resource.id": "pd.pipeline.run-1", "prefect.resource.name": "run-1"},
                         payload=payload)


def test_the_notification_is_one_line_per_round_as_prefects_server_renders_it():
    from prefect.server.utilities.user_templates import render_user_template, validate_user_template

    from deployments.automation import BODY, SUBJECT

    validate_user_template(BODY)
    assert asyncio.run(render_user_template(SUBJECT, {"event": _event(PAYLOAD)})) == "pd: run-1 round 2 completed"
    assert asyncio.run(render_user_template(BODY, {"event": _event(PAYLOAD)})) == (
        "pipeline run-1: round 2 completed (8 -> 4 steps; trained); checkpoint s3://c/r2, fd_digits 12.35")
    reused = {**PAYLOAD, "metrics": None, "trained": False}  # evaluation off, a checkpoint reused
    assert asyncio.run(render_user_template(BODY, {"event": _event(reused)})) == (
        "pipeline run-1: round 2 completed (8 -> 4 steps; reused); checkpoint s3://c/r2")


def test_deploy_creates_one_automation_per_server_sending_every_round_to_the_block(prefect_api: str):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    from deployments.automation import AUTOMATION_NAME, EVENT, ensure_round_notify_automation

    CustomWebhookNotificationBlock(name="pd-test", url="http://127.0.0.1:9/hook",
                                   json_data={"text": "{{body}}"}).save("pd-test", overwrite=True)
    with get_client(sync_client=True) as client:
        first = ensure_round_notify_automation(client, block="custom-webhook/pd-test")
        second = ensure_round_notify_automation(client, block="custom-webhook/pd-test")  # a rerun of deploy
        (automation,) = client.read_automations_by_name(AUTOMATION_NAME)  # replaced, not duplicated
        block = client.read_block_document_by_name("pd-test", block_type_slug="custom-webhook")
    assert automation.id == second != first and automation.enabled
    assert automation.trigger.expect == {EVENT} and automation.trigger.posture == "Reactive"
    assert automation.trigger.match.model_dump() == {"prefect.resource.id": "pd.pipeline.*"}
    (action,) = automation.actions
    assert action.type == "send-notification" and action.block_document_id == block.id


def test_the_pd_notify_flow_is_deployed_only_when_asked_for():
    from deployments import deploy

    spec = deploy.load_spec(deploy.SPEC_PATH)
    names = {d["name"] for d in deploy.plan(spec, deploy.parse_args([]))}
    assert names == {"pd-teacher", "pd-distill", "pd-sweep"}  # the default: no flow run per round
    assert "pd-notify" in {d["name"] for d in deploy.plan(spec, deploy.parse_args(["--notify-flow"]))}
    assert "pd-notify" not in {d["name"] for d in deploy.plan(spec, deploy.parse_args(["--notify-flow",
                                                                                        "--no-notify"]))}
