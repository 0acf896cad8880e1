"""How flow runs show up in Prefect: names from the pipeline, the round a notify run reports, and the
deployments' run form (every parameter described, the preset a choice of the shipped presets).

The run form is what Prefect derives from the flow functions (their parameter schema, as
``Flow.to_deployment`` sends it to the server); names and tags of real runs are checked against
Prefect's server in tests/pipeline/ and the browser test.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from deployments.notify import round_completed_notify, round_label
from flows.identity import pipeline_name, run_name, run_tags
from flows.pipeline import distillation_pipeline
from flows.teacher import train_teacher_flow
from pd_core.config import list_presets

AT = datetime(2026, 11, 30, 19, 20, 59, tzinfo=timezone.utc)


def test_flow_run_names_carry_the_pipeline_and_the_utc_minute():
    assert run_name({"preset": "smoke"}, now=AT) == "smoke-2026-11-30T19-20"  # the preset names its pipeline
    assert run_name({"preset": "smoke", "name": "ablation-7"}, now=AT) == "ablation-7-2026-11-30T19-20"
    assert run_name({"preset": "smoke", "overrides": ["pipeline.name=from-set"]}, now=AT).startswith("from-set-")
    other_zone = AT.astimezone(timezone(timedelta(hours=-5)))  # 14:20 in UTC-5 is the same minute
    assert run_name({"preset": "smoke"}, suffix="-teacher", now=other_zone) == "smoke-teacher-2026-11-30T19-20"


def test_a_run_name_never_fails_on_a_bad_config():
    # The flow itself reports the bad config (one line); naming its run must not fail first.
    assert pipeline_name({"preset": "smoke", "name": "x", "overrides": ["distill.start_steps=6"]}) == "x"
    assert pipeline_name({"preset": "no-such-preset"}) == "no-such-preset"
    assert pipeline_name({"preset": "smoke", "config_path": "/nonexistent.yaml"}) == "smoke"


def test_runs_are_tagged_with_pipeline_and_preset():
    assert run_tags(pipeline="ablation-7", preset="smoke") == ["pipeline:ablation-7", "preset:smoke"]
    assert run_tags(pipeline="p", preset=None) == ["pipeline:p"]


def test_notify_runs_are_named_after_the_round_they_report():
    payload = {"round": 3, "teacher_steps": 2, "student_steps": 1, "checkpoint_uri": "s3://c/r3"}
    assert round_label("smoke", payload) == "smoke-round-03-2to1"  # as the round's task run is named
    assert round_label("smoke", {"round": 2}) == "smoke-round-2"
    assert round_label("smoke", None) == "smoke-round"


@pytest.mark.parametrize("flow", [distillation_pipeline, train_teacher_flow, round_completed_notify],
                         ids=lambda f: f.name)
def test_the_run_form_describes_every_parameter(flow):
    schema = flow.parameters.model_dump_for_openapi()
    assert schema["properties"], flow.name
    for name, prop in schema["properties"].items():
        assert len(prop.get("description", "")) > 15, f"{flow.name}.{name} has no description in the run form"


@pytest.mark.parametrize("flow", [distillation_pipeline, train_teacher_flow], ids=lambda f: f.name)
def test_the_run_form_offers_the_shipped_presets_as_a_choice(flow):
    schema = flow.parameters.model_dump_for_openapi()
    preset = schema["properties"]["preset"]
    choices = preset.get("enum") or next(d["enum"] for d in schema["definitions"].values() if "enum" in d)
    assert sorted(choices) == sorted(list_presets()) and "smoke" in choices
    assert preset["default"] == "smoke"
