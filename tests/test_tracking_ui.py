"""What MLflow's UI gets from the tracker: the experiment declared model training, links into the
model-training view, artifact URLs a browser can open, saved runs-table views, a reopened parent run,
and the `mlflow ui` command that works without the venv. MLflow on a real sqlite file; the command
is run for real (integration)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from mlflow import MlflowClient

from tasks.tracking import Tracker
from tasks.tracking.views import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    VIEW_TAG_PREFIX,
    compare_url,
    merged_columns,
    metric_column,
    view_columns,
    view_tag,
)
from tests import test_tracking
from tests.conftest import free_port

# test_tracking's fixtures, shared: pytest finds fixtures among a module's attributes.
migrated_db, db_uri = test_tracking.migrated_db, test_tracking.db_uri


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "PD_MLFLOW_UI_URL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


def test_a_new_experiment_is_declared_a_model_training_experiment(db_uri: str) -> None:
    Tracker(tracking_uri=db_uri, experiment="pd-new").start_run(run_name="r")
    experiment = MlflowClient(db_uri).get_experiment_by_name("pd-new")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING == "custom_model_development"


def test_an_existing_experiment_is_declared_but_a_kind_chosen_by_hand_is_kept(db_uri: str) -> None:
    client = MlflowClient(db_uri)
    plain = client.create_experiment("pd-old")
    chosen = client.create_experiment("pd-chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    Tracker(tracking_uri=db_uri, experiment="pd-old").start_run(run_name="r")
    Tracker(tracking_uri=db_uri, experiment="pd-chosen").start_run(run_name="r")
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_mlflow_is_told_not_to_print_run_links_or_progress_bars(db_uri: str) -> None:
    Tracker(tracking_uri=db_uri, experiment="pd-quiet")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # the emoji "View run ... at" lines
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_server_links_use_the_public_url_and_open_the_model_training_view(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker reaches MLflow as http://mlflow:5000; people's browsers as http://localhost:5000.
    monkeypatch.setenv("PD_MLFLOW_UI_URL", "http://localhost:5000/")
    tracker = Tracker(tracking_uri="http://mlflow:5000", experiment="x", journal_path="/nonexistent/journal.jsonl")
    assert tracker.ui_url == "http://localhost:5000"
    url = tracker.artifact_url("0123abcd", "samples/samples-ddim-0001.png")
    assert url == "http://localhost:5000/get-artifact?path=samples/samples-ddim-0001.png&run_uuid=0123abcd"
    assert tracker.artifact_url(None, "x.png") is None
    assert Tracker(tracking_uri="http://mlflow:5000", experiment="x", ui_url="https://mlflow.team.org",
                   journal_path="/nonexistent/j.jsonl").artifact_url("r", "a b.png") == \
        "https://mlflow.team.org/get-artifact?path=a%20b.png&run_uuid=r"


def test_a_local_store_links_where_mlflow_ui_will_serve_and_gives_its_command(db_uri: str) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-local")
    run = tracker.start_run(run_name="r")
    assert not tracker.is_server  # nothing serves these links until someone runs the command
    assert tracker.artifact_url(run, "samples/x.png") == \
        f"http://127.0.0.1:5000/get-artifact?path=samples/x.png&run_uuid={run}"
    assert tracker.artifact_url("pending-0123", "samples/x.png") is None  # journaled: no run id yet
    command = tracker.ui_command()
    assert command is not None and shlex.split(command)[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert tracker.experiment_link().endswith("/runs?workflowType=machine_learning")


def test_compare_link_lists_the_runs_as_mlflow_parses_them(db_uri: str) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-compare")
    runs = [tracker.start_run(run_name=f"r{i}") for i in range(2)]
    link = tracker.compare_link(runs)
    fragment = urlsplit(link.split("then open ", 1)[-1]).fragment  # #/compare-runs?runs=...
    query = parse_qs(fragment.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == runs
    assert json.loads(query["experiments"][0]) == [MlflowClient(db_uri).get_experiment_by_name("pd-compare")
                                                   .experiment_id]
    assert query["workflowType"] == ["machine_learning"]
    assert tracker.compare_link([runs[0], "pending-0000"]) is None  # a journaled run has no page yet
    assert unquote(compare_url("b", experiment_id="1", run_ids=["a"])) == \
        'b/#/compare-runs?runs=["a"]&experiments=["1"]&workflowType=machine_learning'
    experiment = MlflowClient(db_uri).get_experiment_by_name("pd-compare").experiment_id
    assert tracker.charts_link("pd-q").endswith(  # the saved view as MLflow's charts
        f"/#/experiments/{experiment}/runs?viewStateShareKey=pd-q&workflowType=machine_learning&compareRunsMode=CHART")


def test_saved_view_holds_the_columns_and_keeps_those_saved_before(db_uri: str) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-view")
    tracker.start_run(run_name="r")
    first = ["distilled_fd_digits_1steps", "distilled_fd_digits_2steps"]
    tracker.save_runs_view(view_id="pd-q", name="Quality", metrics=first, search_filter="tags.`pd.kind` = 'pipeline'")
    client = MlflowClient(db_uri)
    experiment = client.get_experiment_by_name("pd-view")
    envelope = json.loads(experiment.tags[VIEW_TAG_PREFIX + "pd-q"])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "Quality" and envelope["createdAt"] <= envelope["updatedAt"]
    assert state["selectedColumns"] == ["metrics.`distilled_fd_digits_1steps`", "metrics.`distilled_fd_digits_2steps`"]
    assert state["searchFilter"] == "tags.`pd.kind` = 'pipeline'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("attributes.start_time", False)
    # Another pipeline (another dataset) adds its columns; the first pipeline's stay, in their order.
    time.sleep(0.01)
    tracker.save_runs_view(view_id="pd-q", name="Quality", metrics=[first[1], "distilled_fd_x_1steps"])
    again = json.loads(client.get_experiment(experiment.experiment_id).tags[VIEW_TAG_PREFIX + "pd-q"])
    columns = [metric_column(m) for m in (*first, "distilled_fd_x_1steps")]
    assert json.loads(again["state"])["selectedColumns"] == columns
    assert again["createdAt"] == envelope["createdAt"] and again["updatedAt"] > envelope["updatedAt"]
    assert tracker.view_link("pd-q").endswith("/runs?viewStateShareKey=pd-q&workflowType=machine_learning")


def test_view_tag_helpers_read_back_what_they_write_and_survive_junk() -> None:
    value = view_tag(name="n", columns=["a", "b"], search_filter="", created_ms=1, updated_ms=2)
    assert view_columns(value) == (["a", "b"], 1)
    for junk in (None, "", "{", '{"state": 3}', "[]", '{"name": "n", "createdAt": 1, "state": "{"}'):
        assert view_columns(junk) == ([], None)
    assert merged_columns(["a", "b"], ["b", "c", "a"]) == ["a", "b", "c"]


def test_reopen_run_continues_a_finished_run_and_refuses_an_unknown_one(db_uri: str) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-reopen")
    run = tracker.start_run(run_name="parent")
    tracker.end_run(run)
    client = MlflowClient(db_uri)
    assert client.get_run(run).info.status == "FINISHED"
    assert tracker.reopen_run(run) == run
    assert client.get_run(run).info.status == "RUNNING"
    assert tracker.reopen_run("f" * 32) is None  # MLflow has no such run: the caller starts a new one
    assert tracker.pending == 0


@pytest.mark.integration
def test_the_printed_mlflow_ui_command_serves_the_store_without_the_venv(db_uri: str, tmp_path: Path) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-ui")
    run = tracker.start_run(run_name="r")
    tracker.log_metrics(run, {"fd_digits_1steps": 3.5})
    tracker.end_run(run)
    command = tracker.run_link(run).split("  then open ", 1)[0]
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log = tmp_path / "ui.log"
    with log.open("wb") as out:  # no venv on PATH, no VIRTUAL_ENV: the command must not need them
        proc = subprocess.Popen([*shlex.split(command), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a hang bound: MLflow starts slowly on a loaded machine
        while True:
            assert proc.poll() is None, f"`{command}` exited: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"`{command}` did not serve in 300 s: {log.read_text()[-2000:]}"
                time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get?run_id={run}"
        with urllib.request.urlopen(url, timeout=10) as response:
            data = json.loads(response.read())
        assert data["run"]["data"]["metrics"][0]["key"] == "fd_digits_1steps"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_pipelines_params_are_the_settings_that_tell_pipelines_apart_and_the_config_yaml_is_redacted():
    from pd_core.config import load_config, pipeline_params
    from pd_core.config.views import PIPELINE_PARAMS, config_hash
    from tasks.tracking.redact import redacted_mapping

    cfg = load_config(preset="smoke", overrides=["distill.lr=0.001"])
    params = pipeline_params(cfg)
    assert list(params) == [*PIPELINE_PARAMS, "settings_sha256"] and params["distill.lr"] == 0.001
    other_runtime = load_config(preset="smoke", overrides=["distill.lr=0.001", "runtime.threads=2"])
    other_eval = load_config(preset="smoke", overrides=["distill.lr=0.001", "eval.seed=7"])
    assert pipeline_params(other_runtime)["settings_sha256"] == params["settings_sha256"]  # where it runs: same
    assert pipeline_params(other_eval)["settings_sha256"] != params["settings_sha256"]  # how it measures: not
    assert params["settings_sha256"] == config_hash(cfg, sections=("model", "diffusion", "data", "teacher", "distill",
                                                                   "guidance", "eval"))[:16]
    dump = {"storage": {"root": "s3://b", "storage_options": {"secret": "s3cr3t", "client_kwargs": {"x": 1}}},
            "tags": ["a", {"token": "t0k"}]}
    assert redacted_mapping(dump, lambda s: s) == {
        "storage": {"root": "s3://b", "storage_options": {"secret": "***", "client_kwargs": {"x": 1}}},
        "tags": ["a", {"token": "***"}]}
