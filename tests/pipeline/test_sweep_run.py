"""`pd sweep` end to end on the embedded Prefect server: the smoke preset over 2 teacher learning rates x 2
distillation learning rates, MLflow on sqlite, the store in a local folder. Nothing is mocked.

Four pipelines; the two points of each teacher learning rate share one teacher (lineage allows it: the
distillation lr decides no teacher weight), the two teacher learning rates cannot. The sweep's MLflow run
holds the comparison table and the FD-vs-steps plot; a saved view is filtered to the sweep; a rerun trains
nothing. The smoke preset is made lighter still (20 teacher updates, 4 per round, rounds 4 -> 2 -> 1, 100
samples per measurement): the orchestration, not the numbers, is under test.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.pipeline.helpers import is_png, mlflow_client, pd_command

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

SWEEP = "itsweep"
LIGHT = ["teacher.updates=20", "distill.updates_per_round=4", "distill.start_steps=4", "eval.num_samples=100",
         "eval.kid_subset_size=50", "eval.stochastic_gammas=[]", "eval.classifier_epochs=1", "eval.grid_size=2"]
GRID = ["teacher.lr=1e-3,2e-3", "distill.lr=3e-4,5e-4"]
POINTS = {f"{SWEEP}.teacher_lr-{t}.distill_lr-{d}": {"teacher.lr": t, "distill.lr": d}
          for t in ("1e-3", "2e-3") for d in ("3e-4", "5e-4")}
LEADERS = {name: name.replace("distill_lr-5e-4", "distill_lr-3e-4") for name in POINTS}


@dataclass
class Sweep:
    home: Path
    store: Path
    tracking_uri: str
    first: subprocess.CompletedProcess
    rerun: subprocess.CompletedProcess | None = None


def _pd_sweep(home: Path) -> subprocess.CompletedProcess:
    """``pd sweep`` as a user runs it, on its embedded Prefect server (no PREFECT_API_URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("PD_DEBUG", "PD_STORAGE",
                                                                                           "MLFLOW_TRACKING_URI")}
    env.update(PD_HOME=str(home), DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    args = ["sweep", "--name", SWEEP, *[a for s in LIGHT for a in ("--set", s)],
            *[a for g in GRID for a in ("--grid", g)]]
    return subprocess.run([*pd_command(), *args], cwd=home, env=env, capture_output=True, text=True, timeout=800)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    home = tmp_path_factory.mktemp("sweep-home")
    first = _pd_sweep(home)
    assert first.returncode == 0, first.stderr[-3000:]
    return Sweep(home=home, store=home / "store", tracking_uri=f"sqlite:///{home / 'mlflow.db'}", first=first)


@pytest.fixture(scope="module")
def rerun(sweep: Sweep) -> subprocess.CompletedProcess:
    sweep.rerun = _pd_sweep(sweep.home)
    assert sweep.rerun.returncode == 0, sweep.rerun.stderr[-3000:]
    return sweep.rerun


def _manifest(sweep: Sweep, key: str) -> dict:
    return json.loads((sweep.store / key / "manifest.json").read_text())


def _sweep_run(sweep: Sweep):
    client = mlflow_client(sweep.tracking_uri)
    experiment = client.get_experiment_by_name("progressive-distillation")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`pd.sweep` = '{SWEEP}' AND "
                              "tags.`pd.kind` = 'sweep'", order_by=["attributes.start_time ASC"])
    return client, experiment, runs


def test_the_sweep_runs_one_pipeline_per_point_named_after_what_it_changes(sweep: Sweep) -> None:
    folders = sorted(p.name for p in (sweep.store / "pipelines").iterdir())
    assert folders == sorted(POINTS)
    for name in POINTS:
        rounds = sorted(p.name for p in (sweep.store / "pipelines" / name / "rounds").iterdir()
                        if p.name[-4:].isdigit())
        assert rounds == ["01-0002", "02-0001"], (name, rounds)
        assert f"{name}: trained" in sweep.first.stdout


def test_points_that_share_the_teachers_lineage_share_one_teacher_without_a_copy(sweep: Sweep) -> None:
    teachers = {name: _manifest(sweep, f"pipelines/{leader}/teacher")["sha256"] for name, leader in LEADERS.items()}
    assert len(set(teachers.values())) == 2  # one per teacher learning rate
    for name, leader in LEADERS.items():
        has_own = (sweep.store / "pipelines" / name / "teacher").exists()
        assert has_own == (name == leader), name  # the sharing point holds no copy
        first_round = _manifest(sweep, f"pipelines/{name}/rounds/01-0002")
        assert first_round["parent_sha256"] == teachers[name], name  # distilled from the shared teacher
        if name != leader:
            assert f"{name}: trained 2 checkpoint(s), shares the teacher of {leader}" in sweep.first.stdout


def test_every_pipeline_carries_the_sweep_and_its_grid_values_as_tags_and_params(sweep: Sweep) -> None:
    client, experiment, _ = _sweep_run(sweep)
    for name, values in POINTS.items():
        runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}' AND "
                                  "tags.`pd.kind` = 'pipeline'")
        assert runs, name
        for run in runs:
            assert run.data.tags["pd.sweep"] == SWEEP and run.data.params["pd.sweep"] == SWEEP
            for key, value in values.items():
                assert run.data.tags[f"pd.sweep.{key}"] == value and run.data.params[f"pd.sweep.{key}"] == value


def test_the_sweep_run_holds_the_comparison_table_and_the_fd_plot(sweep: Sweep) -> None:
    client, _, runs = _sweep_run(sweep)
    run = runs[0]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"comparison.csv", "comparison.json", "fd_vs_steps.png"} <= files, files
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "comparison.csv"),
                        dtype={"teacher.lr": str, "distill.lr": str})
    assert list(table["point"]) == list(POINTS)
    assert [str(v) for v in table["distill.lr"]] == [v["distill.lr"] for v in POINTS.values()]
    for record in table.to_dict(orient="records"):  # each cell is the number the point's own report holds
        quality = pd.read_csv(sweep.store / "pipelines" / record["point"] / "report" / "quality.csv")
        for steps in (1, 2):
            want = float(quality.loc[quality["steps"] == steps, "distilled_fd_digits"].iloc[0])
            assert record[f"distilled_fd_digits_{steps}steps"] == pytest.approx(want, rel=1e-9)
        want = float(quality.loc[quality["steps"] == 4, "teacher_ddim_fd_digits"].iloc[0])
        assert record["teacher_ddim_fd_digits_4steps"] == pytest.approx(want, rel=1e-9)
    assert is_png(Path(client.download_artifacts(run.info.run_id, "fd_vs_steps.png")))
    stored = pd.read_csv(io.BytesIO((sweep.store / "sweeps" / SWEEP / "comparison.csv").read_bytes()))
    assert list(stored["point"]) == list(POINTS)


def test_the_saved_view_is_filtered_to_the_sweep_and_shows_grid_values_and_fd_per_step(sweep: Sweep) -> None:
    client, experiment, _ = _sweep_run(sweep)
    tag = client.get_experiment(experiment.experiment_id).tags[f"mlflow.sharedViewState.pd-sweep-{SWEEP}"]
    state = json.loads(json.loads(tag)["state"])
    assert state["searchFilter"] == f"tags.`pd.sweep` = '{SWEEP}' AND tags.`pd.kind` = 'pipeline'"
    assert state["selectedColumns"] == ["params.`pd.sweep.teacher.lr`", "params.`pd.sweep.distill.lr`",
                                        "metrics.`distilled_fd_digits_1steps`", "metrics.`distilled_fd_digits_2steps`"]
    found = client.search_runs([experiment.experiment_id], filter_string=state["searchFilter"])
    assert {r.info.run_name for r in found} == set(POINTS)
    assert all("distilled_fd_digits_1steps" in r.data.metrics for r in found)


def test_a_rerun_of_the_sweep_trains_nothing(sweep: Sweep, rerun: subprocess.CompletedProcess) -> None:
    for name in POINTS:
        assert f"{name}: reused everything" in rerun.stdout, rerun.stdout[-2000:]
    for name, leader in LEADERS.items():  # the same checkpoints, untouched
        first_round = _manifest(sweep, f"pipelines/{name}/rounds/01-0002")
        assert first_round["parent_sha256"] == _manifest(sweep, f"pipelines/{leader}/teacher")["sha256"]
    client, _, runs = _sweep_run(sweep)
    assert len(runs) == 2  # one sweep run per invocation, both with the table
    assert "comparison.csv" in {f.path for f in client.list_artifacts(runs[1].info.run_id)}
