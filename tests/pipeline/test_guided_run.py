"""Guided distillation end to end: a class-conditional digits teacher, ``guide-distill`` (stage 1), the rounds
over the w-conditioned student (stage 2), evaluation per guidance weight; real Prefect, MLflow on sqlite, a local
store. A second run trains nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.helpers import assert_one_line_error, children_of, is_png, mlflow_client, parent_of
from tests.pipeline.helpers import run_pd as run_pd_process

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

NAME = "smoke-guided"  # the preset's pipeline name, as benchmarks/guided/reproduce.py runs it
ROUND_STEPS = [(8, 4), (4, 2), (2, 1)]
WEIGHTS = (0.0, 1.0)  # eval.guidance_weights of the smoke-guided preset


@pytest.fixture(scope="module")
def runs(smoke_guided: dict) -> dict:
    """The smoke-guided preset run twice with the same name, store and MLflow (tests/conftest.py)."""
    return smoke_guided


def test_both_stages_run_and_each_checkpoint_descends_from_the_last(runs: dict) -> None:
    from pd_core.store import CheckpointStore

    result = runs["first"]
    assert result.guided is not None and result.guided.trained and result.teacher.trained
    assert all(r.trained for r in result.rounds) and [r.steps for r in result.rounds] == [s for _, s in ROUND_STEPS]
    store = CheckpointStore(str(runs["home"] / "store"))
    teacher = store.read_manifest(result.teacher.key)
    assert teacher["unet"]["num_classes"] == 10 and teacher["unet"]["null_class"]
    assert not teacher["unet"]["guidance_embedding"]
    guided = store.read_manifest(result.guided.key)
    assert (guided["kind"], guided["steps"], guided["parent_sha256"]) == ("guided_student", 8, teacher["sha256"])
    assert guided["unet"]["guidance_embedding"] and (guided["w_min"], guided["w_max"]) == (0.0, 2.0)
    parent = guided["sha256"]
    for info in result.rounds:
        manifest = store.read_manifest(info.key)
        assert manifest["parent_sha256"] == parent and manifest["unet"]["guidance_embedding"]
        parent = manifest["sha256"]


def test_a_rerun_trains_nothing(runs: dict) -> None:
    first, second = runs["first_data"], runs["second_data"]
    again = runs["second"]
    assert again.guided is not None and not again.guided.trained and not again.teacher.trained
    assert not any(r.trained for r in again.rounds)
    assert again.guided.sha256 == runs["first"].guided.sha256
    assert [r["sha256"] for r in second["rounds"]] == [r["sha256"] for r in first["rounds"]]


def test_mlflow_tracks_stage_one_like_a_round_with_metrics_per_weight(runs: dict) -> None:
    client = mlflow_client(runs["tracking_uri"])
    result = runs["first"]
    children = children_of(client, parent_of(client, result.teacher.mlflow_run_id))
    # MLflow child runs carry their pipeline's name first (<pipeline>/<task-run name>), as in every pipeline.
    names = [f"{NAME}/round-{i:02d}-{t}to{s}" for i, (t, s) in enumerate(ROUND_STEPS, start=1)]
    assert sorted(children) == sorted([f"{NAME}/teacher", f"{NAME}/guide-distill", *names])
    stage1 = children[f"{NAME}/guide-distill"]
    assert (stage1.data.tags["pd.run"], stage1.data.tags["pd.kind"]) == ("guide-distill", "guided_student")
    assert stage1.info.run_id == result.guided.mlflow_run_id
    assert (stage1.data.params["w_min"], stage1.data.params["w_max"]) == ("0.0", "2.0")
    assert stage1.data.params["guidance.enabled"] == "True"
    assert len(client.get_metric_history(stage1.info.run_id, "train_loss")) >= 3
    for run in [stage1, *(children[n] for n in names)]:
        assert run.data.params["w_max"] == "2.0", run.info.run_name
        for w in WEIGHTS:
            for metric in ("fd_digits", "kid_digits", "sample_accuracy"):
                assert f"{metric}_w{w:g}" in run.data.metrics, (run.info.run_name, metric, w)
            assert run.data.tags[f"sample_grid_w{w:g}"].endswith(f"-w{w:g}.png")
    teacher = children[f"{NAME}/teacher"]
    steps = sorted(m.step for m in client.get_metric_history(teacher.info.run_id, "ddim_sample_accuracy_w1"))
    assert steps == [1, 2, 4, 8]


def test_prefect_shows_the_guide_distill_task(runs: dict) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    client = mlflow_client(runs["tracking_uri"])
    parent = client.get_run(parent_of(client, runs["first"].teacher.mlflow_run_id))
    names = [f"round-{i:02d}-{t}to{s}" for i, (t, s) in enumerate(ROUND_STEPS, start=1)]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[parent.data.tags["prefect.flow_run_id"]])))
    assert sorted(r.name for r in task_runs) == sorted(
        ["teacher", "eval-teacher", "guide-distill", "eval-guide-distill", *names, *[f"eval-{n}" for n in names],
         "report"])
    assert all(r.state.is_completed() for r in task_runs)


def test_the_report_holds_teacher_and_students_per_weight(runs: dict) -> None:
    import io

    import pandas as pd

    from pd_core.store import CheckpointStore

    store = CheckpointStore(str(runs["home"] / "store"))
    long = pd.read_csv(io.BytesIO(store.get_bytes(f"pipelines/{NAME}/report/quality_long.csv")))
    assert list(long.columns) == ["sampler", "steps", "w", "metric", "value", "n_samples", "seconds_per_image"]
    acc = long[long.metric == "sample_accuracy"]
    got = {(r.sampler, int(r.steps), float(r.w)) for r in acc.itertuples()}
    want = {("teacher_ddim", s, w) for s in (8, 4, 2, 1) for w in WEIGHTS}
    want |= {("distilled", s, w) for s in (8, 4, 2, 1) for w in WEIGHTS}  # 8 steps: the stage-1 student
    assert got == want
    assert acc["value"].between(0, 1).all()
    assert "teacher_ddim_w1_fd_digits" in runs["first_data"]["table"]


def test_pd_sample_takes_a_guidance_weight_and_a_label(runs: dict, tmp_path: Path) -> None:
    final = runs["first"].rounds[-1].uri
    env = {"PD_HOME": str(runs["home"])}
    out = tmp_path / "grid.png"
    proc = run_pd_process("sample", "--model", final, "--num", "20", "--guidance", "1.5", "--label", "3",
                          "--out", str(out), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "class 3, guidance w = 1.5" in proc.stdout and is_png(out)
    bad = run_pd_process("sample", "--model", final, "--label", "10", "--out", str(tmp_path / "x.png"), cwd=tmp_path,
                         env=env)
    assert_one_line_error(bad, code=2, mentions="--label must be a class in [0, 9]")  # a bad argument: exit 2
