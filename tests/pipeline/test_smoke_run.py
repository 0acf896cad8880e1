"""Integration tests of the orchestrated pipeline: real Prefect, MLflow on sqlite, S3 through moto.

Nothing is mocked. The pipeline flow runs in this process against the Prefect test harness (a real
Prefect server subprocess); checkpoints go to ``s3://`` on moto's ThreadedMotoServer (127.0.0.1);
MLflow tracks into a sqlite file; the ``pd`` console script runs as a subprocess, as a user runs it.

One finished ``smoke`` pipeline is shared by the tests here (module fixture ``pipeline``); the second
run of it (``rerun``) must train nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAKE_AWS_KEY_ID, FAKE_AWS_SECRET, MotoS3
from tests.pipeline.helpers import (
    Pipeline,
    as_plain_data,
    assert_one_line_error,
    children_of,
    is_png,
    mlflow_client,
    open_store,
    parent_of,
    run_pd,
    write_storage_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

NAME = "itest"
ROUND_STEPS = [(8, 4), (4, 2), (2, 1)]  # the smoke preset's rounds (teacher steps, student steps)
EVAL_METRICS = ("fd_digits", "kid_digits", "seconds_per_image")
ROUND_FOLDER = re.compile(r"^\d{2}-\d{4}$")  # rounds/03-0001, not 03-0001.eval / .state / .mlflow-*.json


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def pipeline(moto_server: MotoS3, prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The ``smoke`` preset run end to end once: checkpoints on s3:// (moto), MLflow on a sqlite file."""
    home = tmp_path_factory.mktemp("pd-home")
    workdir = tmp_path_factory.mktemp("cwd")
    bucket = moto_server.make_bucket(None)
    root = f"s3://{bucket}/runs"
    config_path = write_storage_config(home / "storage.yaml", root=root, moto=moto_server)
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PD_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PD_STORAGE", raising=False)
        from flows.pipeline import distillation_pipeline

        t0 = time.perf_counter()
        result = as_plain_data(distillation_pipeline(preset="smoke", name=NAME, config_path=str(config_path),
                                                     tracking_uri=tracking_uri))
        seconds = time.perf_counter() - t0
        print(f"\nfirst smoke run: {seconds:.1f}s")
        yield Pipeline(name=NAME, home=home, workdir=workdir, root=root, bucket=bucket, config_path=config_path,
                       tracking_uri=tracking_uri, moto=moto_server, result=result, seconds=seconds)


@pytest.fixture(scope="module")
def rerun(pipeline: Pipeline) -> tuple[dict, float]:
    """The same pipeline run a second time (same name, config, store and MLflow)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PD_HOME", str(pipeline.home))
        result, seconds = pipeline.run_again()
    print(f"\nsecond smoke run: {seconds:.1f}s (first {pipeline.seconds:.1f}s, ratio {seconds / pipeline.seconds:.3f})")
    return result, seconds


# ----------------------------------------------------------------------------------------------
# The pipeline end to end


def test_smoke_runs_end_to_end_on_s3(pipeline: Pipeline) -> None:
    result = pipeline.result
    assert result["pipeline"] == NAME
    teacher, rounds = result["teacher"], result["rounds"]
    assert teacher["trained"] and teacher["steps"] == 8 and teacher["round"] == 0
    assert [(r["round"], r["steps"]) for r in rounds] == [(i, s) for i, (_, s) in enumerate(ROUND_STEPS, start=1)]
    assert all(r["trained"] and r["resumed_from"] == 0 for r in rounds)
    for info in [teacher, *rounds]:
        assert info["uri"].startswith(f"s3://{pipeline.bucket}/runs/pipelines/{NAME}/"), info["uri"]
        assert re.fullmatch(r"[0-9a-f]{64}", info["sha256"])
        assert info["mlflow_run_id"] and not info["mlflow_run_id"].startswith("pending-")
    assert result["report_uri"] == f"s3://{pipeline.bucket}/runs/pipelines/{NAME}/report/quality.csv"
    assert "distilled_fd_digits" in result["table"]
    assert result["registered"]["registered_model"] == f"pd-{NAME}"
    assert not (pipeline.workdir / ".pd").exists()  # nothing leaked into a working directory


def test_store_holds_one_verified_checkpoint_per_round(pipeline: Pipeline) -> None:
    store = open_store(pipeline.root, pipeline.moto)
    prefix = f"pipelines/{NAME}"
    result = pipeline.result
    folders = [k for k in store.list(f"{prefix}/rounds") if ROUND_FOLDER.match(k.rsplit("/", 1)[1])]
    assert folders == [r["key"] for r in result["rounds"]] == [
        f"{prefix}/rounds/{i:02d}-{s:04d}" for i, (_, s) in enumerate(ROUND_STEPS, start=1)]
    parent_sha = result["teacher"]["sha256"]
    assert store.is_complete(result["teacher"]["key"])
    for info, (teacher_steps, student_steps) in zip(result["rounds"], ROUND_STEPS, strict=True):
        key = info["key"]
        assert store.is_complete(key), f"{key} is not a complete, verified checkpoint"
        manifest = store.read_manifest(key)
        assert manifest["sha256"] == info["sha256"]
        assert (manifest["kind"], manifest["steps"], manifest["teacher_steps"]) == (
            "student", student_steps, teacher_steps)
        assert manifest["parent_sha256"] == parent_sha, "each round must be distilled from the previous student"
        parent_sha = manifest["sha256"]
        assert not store.exists(f"{key}.state"), "the in-round state must be cleared once the round is saved"
        tensors, _ = store.load_checkpoint(key, expected_sha256=info["sha256"])  # verified load
        assert tensors


def test_mlflow_holds_parent_and_one_child_per_round(pipeline: Pipeline) -> None:
    from pd_core.config import flatten, validate_config
    from pd_core.config.views import PIPELINE_PARAMS
    from tasks.common import resolve_config

    client = mlflow_client(pipeline.tracking_uri)
    result = pipeline.result
    parent_id = parent_of(client, result["teacher"]["mlflow_run_id"])
    parent = client.get_run(parent_id)
    assert parent.info.run_name == NAME and parent.info.status == "FINISHED"
    assert parent.data.tags["pd.kind"] == "pipeline"
    children = children_of(client, parent_id)
    # Child runs carry their pipeline's name, so runs of several pipelines tell themselves apart.
    names = [f"{NAME}/round-{i:02d}-{t}to{s}" for i, (t, s) in enumerate(ROUND_STEPS, start=1)]
    assert sorted(children) == sorted([f"{NAME}/teacher", *names])

    # Params: the settings that tell pipelines apart, same names in every run (+ round/teacher_steps/student_steps);
    # the whole resolved config is the parent's config.yaml.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PD_HOME", str(pipeline.home))
        cfg = resolve_config(preset="smoke", name=NAME, config_path=str(pipeline.config_path),
                             tracking_uri=pipeline.tracking_uri)
    config_names = set(PIPELINE_PARAMS) | {"settings_sha256"}
    assert set(parent.data.params) == config_names and len(config_names) <= 25
    (pipeline.home / "cfg").mkdir(exist_ok=True)
    logged = yaml.safe_load(Path(client.download_artifacts(parent_id, "config.yaml", str(pipeline.home / "cfg")))
                            .read_text())
    assert flatten(validate_config(logged)) == flatten(cfg)  # the whole resolved config, loadable as it is
    assert parent.data.params["distill.start_steps"] == "8" and parent.data.params["pipeline.name"] == NAME
    per_run = {"round", "teacher_steps", "student_steps"}
    for run in children.values():
        assert set(run.data.params) == config_names | per_run, run.info.run_name
    teacher_run = children[f"{NAME}/teacher"]
    assert (teacher_run.data.params["round"], teacher_run.data.params["student_steps"]) == ("0", "8")

    infos = {f"{NAME}/round-{r['round']:02d}-{2 * r['steps']}to{r['steps']}": r for r in result["rounds"]}
    infos[f"{NAME}/teacher"] = result["teacher"]
    for run_name, run in children.items():
        info = infos[run_name]
        assert run.info.run_id == info["mlflow_run_id"]
        assert run.info.status == "FINISHED", run_name
        tags = run.data.tags
        assert tags["checkpoint_uri"] == info["uri"] and tags["checkpoint_sha256"] == info["sha256"]
        assert tags["skipped"] == "false"
        # Training loss by step: the whole curve, not just the last value.
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) >= 3 and len({m.step for m in history}) == len(history), run_name
        assert "train_seconds" in run.data.metrics
    for index, ((t, s), run_name) in enumerate(zip(ROUND_STEPS, names, strict=True), start=1):
        run = children[run_name]
        assert (run.data.params["round"], run.data.params["teacher_steps"], run.data.params["student_steps"]) == (
            str(index), str(t), str(s))
        for metric in EVAL_METRICS:
            assert metric in run.data.metrics, f"{run_name} lacks {metric}"
        assert run.data.metrics["seconds_per_image"] > 0
        assert run.data.tags["sample_grid"].endswith(f"/rounds/{index:02d}-{s:04d}.eval/samples-ddim-{s:04d}.png")
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id) if not a.is_dir]
        assert artifacts == ["samples-ddim.png"], artifacts  # one top-level name in every round: Compare shows them
    # The teacher's DDIM baselines at every step count of the chain: a series by step, and a key per step count.
    steps = sorted(m.step for m in client.get_metric_history(teacher_run.info.run_id, "ddim_fd_digits"))
    assert steps == [1, 2, 4, 8]
    for n in steps:
        assert teacher_run.data.metrics[f"ddim_fd_digits_{n}steps"] == next(
            m.value for m in client.get_metric_history(teacher_run.info.run_id, "ddim_fd_digits") if m.step == n)
    assert [a.path for a in client.list_artifacts(teacher_run.info.run_id) if not a.is_dir] == ["samples-ddim.png"]
    # The parent carries the quality table, the series by step count and one key per step count (what
    # MLflow's overview and Compare page show), equal to the table's values.
    assert "distilled_fd_digits" in parent.data.metrics and "teacher_ddim_fd_digits" in parent.data.metrics
    assert {"quality.csv", "report.md"} <= {a.path for a in client.list_artifacts(parent_id)}
    table = {int(row["steps"]): row for row in _quality_rows(client, parent_id)}
    for n in (1, 2, 4):
        assert parent.data.metrics[f"distilled_fd_digits_{n}steps"] == pytest.approx(table[n]["distilled_fd_digits"])
    for n in (1, 2, 4, 8):
        assert parent.data.metrics[f"teacher_ddim_fd_digits_{n}steps"] == pytest.approx(
            table[n]["teacher_ddim_fd_digits"])
    assert parent.data.metrics["floor_fd_digits"] == pytest.approx(table[1]["floor_fd_digits"])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's model-training view
    view = json.loads(json.loads(experiment.tags["mlflow.sharedViewState.pd-quality-by-steps"])["state"])
    assert "metrics.`distilled_fd_digits_1steps`" in view["selectedColumns"]


def _quality_rows(client, run_id: str) -> list[dict]:
    import csv
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "quality.csv", tmp)
        with open(path, newline="") as f:
            return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


def test_prefect_shows_round_tasks_artifacts_and_events(pipeline: Pipeline) -> None:
    """What a user sees in the Prefect UI: named task runs, progress/table/markdown artifacts, round events."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    client = mlflow_client(pipeline.tracking_uri)
    flow_run_id = client.get_run(parent_of(client, pipeline.result["teacher"]["mlflow_run_id"])).data.tags[
        "prefect.flow_run_id"]
    names = [f"round-{i:02d}-{t}to{s}" for i, (t, s) in enumerate(ROUND_STEPS, start=1)]
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        assert flow_run.state.is_completed()
        # Found by name and tag: "itest-2026-11-30T19-20", pipeline:itest, preset:smoke.
        assert re.fullmatch(rf"{NAME}-\d{{4}}-\d\d-\d\dT\d\d-\d\d", flow_run.name), flow_run.name
        assert {f"pipeline:{NAME}", "preset:smoke"} <= set(flow_run.tags)
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        assert sorted(r.name for r in runs) == sorted(
            ["teacher", "eval-teacher", *names, *[f"eval-{n}" for n in names], "report"])
        assert all(r.state.is_completed() for r in runs)
        # On a standing server (the harness here) the GPU tasks carry the `gpu` tag a limit can hold them by.
        assert all("gpu" in r.tags for r in runs if r.name != "report")
        assert not any("gpu" in r.tags for r in runs if r.name == "report")
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        by_key = {a.key: a for a in artifacts if a.key}
        assert by_key[f"{NAME}-quality"].type == "table"
        rows = json.loads(by_key[f"{NAME}-quality"].data)  # the CLI's concise table, not every column
        assert list(rows[0]) == pipeline.result["table"].splitlines()[0].split()
        assert [r["steps"] for r in rows] == [1, 2, 4, 8]
        report = by_key[f"{NAME}-report"]
        assert report.type == "markdown" and "MLflow" in report.data
        # MLflow on a local file: no server to show the grids from, so the report says where each PNG is.
        for _, s in ROUND_STEPS:
            assert "/rounds/" in report.data and f"samples-ddim-{s:04d}.png" in report.data
        assert "mlflow ui --backend-store-uri" in report.data
        for key in [f"{NAME}-teacher", *[f"{NAME}-{n}" for n in names]]:
            assert by_key[key].type == "progress" and float(by_key[key].data) == 100.0, key
        # One pd.round.completed event per round, on the pipeline's resource, related to this flow run.
        query = {"filter": {"event": {"name": ["pd.round.completed"]},
                            "any_resource": {"id": [f"pd.pipeline.{NAME}"]},
                            "related": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50}
        deadline = time.monotonic() + 60  # the server persists events asynchronously
        while True:
            events = prefect.request("POST", "/events/filter", json=query).json()["events"]
            if len(events) >= len(ROUND_STEPS) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    payloads = sorted((e["payload"] for e in events), key=lambda p: p["round"])
    assert [(p["round"], p["teacher_steps"], p["student_steps"]) for p in payloads] == [
        (i, t, s) for i, (t, s) in enumerate(ROUND_STEPS, start=1)]
    for p, info in zip(payloads, pipeline.result["rounds"], strict=True):
        assert p["checkpoint_uri"] == info["uri"] and p["checkpoint_sha256"] == info["sha256"] and p["trained"]
        assert all(m in p["metrics"] for m in EVAL_METRICS)


def test_credentials_are_written_nowhere(pipeline: Pipeline) -> None:
    """The fake AWS key id and secret are in the environment only: not in MLflow, its artifacts or the store."""
    secrets = (FAKE_AWS_SECRET.encode(), FAKE_AWS_KEY_ID.encode())
    scanned = 0
    for path in pipeline.home.rglob("*"):  # mlflow.db, mlartifacts/, the journal
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            assert not any(s in data for s in secrets), f"credential found in {path}"
    store = open_store(pipeline.root, pipeline.moto)
    for path in store.fs.find(f"{pipeline.bucket}/runs"):
        data = store.fs.cat_file(path)
        scanned += 1
        assert not any(s in data for s in secrets), f"credential found in s3://{path}"
    assert scanned > 20


def test_registered_model_loads_back_through_pd_sample(pipeline: Pipeline) -> None:
    client = mlflow_client(pipeline.tracking_uri)
    model = f"pd-{NAME}"
    final = client.get_model_version_by_alias(model, "final")
    assert final.run_id == pipeline.result["rounds"][-1]["mlflow_run_id"]  # the 1-step student
    client.get_model_version_by_alias(model, "best-few-step")
    out = pipeline.workdir / "final.png"
    proc = pipeline.pd("sample", "--model", f"models:/{model}@final", "--num", "4", "--out", str(out),
                       env={"MLFLOW_TRACKING_URI": pipeline.tracking_uri})
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 samples (ddim, 1 step)" in proc.stdout
    assert is_png(out)
    # Embedded defaults: no MLFLOW_TRACKING_URI, the sqlite file `pd run` tracks into (PD_HOME/mlflow.db) is found.
    assert pipeline.tracking_uri == f"sqlite:///{pipeline.home / 'mlflow.db'}"
    out2 = pipeline.workdir / "best.png"
    proc = pipeline.pd("sample", "--model", f"models:/{model}@best-few-step", "--num", "4", "--out", str(out2),
                       env={"PD_HOME": str(pipeline.home)})
    assert proc.returncode == 0, proc.stderr
    assert is_png(out2) and not (pipeline.workdir / "mlflow.db").exists()


# ----------------------------------------------------------------------------------------------
# Rerun: nothing to train


def test_second_run_trains_nothing(pipeline: Pipeline, rerun: tuple[dict, float]) -> None:
    result, seconds = rerun
    first = pipeline.result
    infos = [result["teacher"], *result["rounds"]]
    assert [i["trained"] for i in infos] == [False] * 4, "a finished pipeline must not train again"
    assert all(i["train_seconds"] == 0.0 and i["resumed_from"] == 0 for i in infos)
    assert [i["sha256"] for i in infos] == [i["sha256"] for i in [first["teacher"], *first["rounds"]]]
    ratio = seconds / pipeline.seconds
    print(f"\nrerun wall time {seconds:.1f}s vs first run {pipeline.seconds:.1f}s: ratio {ratio:.3f}")
    # MLflow: a new parent run whose children record the skip and no training curve.
    client = mlflow_client(pipeline.tracking_uri)
    parent_id = parent_of(client, result["teacher"]["mlflow_run_id"])
    assert parent_id != parent_of(client, first["teacher"]["mlflow_run_id"])
    for run_name, run in children_of(client, parent_id).items():
        assert run.data.tags["skipped"] == "true", run_name
        assert not client.get_metric_history(run.info.run_id, "train_loss"), f"{run_name} trained on the rerun"
        if run_name != f"{NAME}/teacher":  # cached evaluation records still reach each round's run
            assert all(m in run.data.metrics for m in EVAL_METRICS), run_name
    # The registered model got no duplicate versions.
    versions = mlflow_client(pipeline.tracking_uri).search_model_versions(f"name = 'pd-{NAME}'")
    assert len(versions) == len(first["registered"]) - 1


# ----------------------------------------------------------------------------------------------
# The CLI


def test_cli_sample_from_checkpoint_uri(pipeline: Pipeline) -> None:
    out = pipeline.workdir / "ckpt.png"
    uri = pipeline.result["rounds"][-1]["uri"]  # s3://.../rounds/03-0001, as `pd run` prints it
    proc = pipeline.pd("sample", "--model", uri, "--steps", "1", "--num", "4", "--out", str(out), env=pipeline.s3_env)
    assert proc.returncode == 0, proc.stderr
    assert is_png(out)
    from PIL import Image

    with Image.open(out) as image:
        assert image.size[0] >= 512  # a 2x2 grid of 8x8 digits, enlarged to a readable size (16 px at 1x)
    proc = pipeline.pd("sample", "--model", uri, "--steps", "1", "--num", "4", "--out", str(out), "--scale", "3",
                       env=pipeline.s3_env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        assert image.size[0] == 2 * (3 * 8 + 2) + 2  # 2 columns of 8 px digits x 3, 2 px padding


def test_cli_sample_bad_model_is_one_line(pipeline: Pipeline) -> None:
    missing = f"s3://{pipeline.bucket}/runs/pipelines/{NAME}/rounds/09-0009"
    proc = pipeline.pd("sample", "--model", missing, "--steps", "1", "--num", "4", "--out",
                       str(pipeline.workdir / "never.png"), env=pipeline.s3_env)
    assert_one_line_error(proc, code=2, mentions=missing)  # a checkpoint that is not there: a bad argument
    assert not (pipeline.workdir / "never.png").exists()
    proc = pipeline.pd("sample", "--model", "not-a-uri", "--num", "4", "--out", str(pipeline.workdir / "never.png"))
    assert_one_line_error(proc, code=2, mentions="not-a-uri")


def test_cli_show_prints_the_table(pipeline: Pipeline) -> None:
    proc = pipeline.pd("show", NAME, "--storage", pipeline.root, env=pipeline.s3_env)
    assert proc.returncode == 0, proc.stderr
    for info in [pipeline.result["teacher"], *pipeline.result["rounds"]]:
        assert info["uri"] in proc.stdout
    assert "distilled_fd_digits" in proc.stdout and "teacher_ddim_fd_digits" in proc.stdout
    table = proc.stdout.split("\n\n", 1)[1].strip().splitlines()
    assert len(table) == 1 + 4 + 1  # header + steps 1, 2, 4, 8 + where the full CSV is
    assert "quality.csv" in table[-1]
    missing = pipeline.pd("show", "no-such-pipeline", "--storage", pipeline.root, env=pipeline.s3_env)
    assert_one_line_error(missing, code=1, mentions="no-such-pipeline")


def test_cli_presets(tmp_path: Path) -> None:
    proc = run_pd("presets", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert "smoke" in names and len(names) == len(set(names)) >= 2
    assert all(len(line.split(None, 1)) == 2 for line in lines), "each preset needs a one-line description"
    for name, line in zip(names, lines, strict=True):
        assert line.count(name) == 1, f"the preset's name is printed twice: {line}"


def test_cli_sample_bad_scale_exits_2_before_loading_anything(tmp_path: Path) -> None:
    for bad in ("0", "33", "big"):
        proc = run_pd("sample", "--model", "s3://nowhere/x", "--scale", bad, "--out", str(tmp_path / "x.png"),
                      cwd=tmp_path)
        assert_one_line_error(proc, code=2, mentions="--scale")
    assert not (tmp_path / "x.png").exists()


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_pd("config", "--preset", "smoke", "--set", "distill.start_steps=6", cwd=tmp_path)
    assert_one_line_error(proc, code=2, mentions="distill.start_steps")
    assert proc.stdout == ""
    good = run_pd("config", "--preset", "smoke", "--set", "distill.start_steps=16", cwd=tmp_path)
    assert good.returncode == 0 and yaml.safe_load(good.stdout)["distill"]["start_steps"] == 16


def test_cli_unknown_preset_exits_2(tmp_path: Path) -> None:
    proc = run_pd("run", "--preset", "nope", cwd=tmp_path)
    assert_one_line_error(proc, code=2, mentions="nope")
    assert not (tmp_path / ".pd").exists() and not (tmp_path / "mlflow.db").exists()
