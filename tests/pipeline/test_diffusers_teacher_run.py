"""``pd run --teacher-uri diffusers:<folder>``: the whole flow (import, rounds, evaluation, MLflow, report) on a tiny
UNet2DModel saved with save_pretrained; a rerun trains nothing; the registered few-step student samples and exports.

Real parts only: the ``pd`` console script in a subprocess, the Prefect test server, MLflow on a sqlite file,
a local checkpoint store. The teacher is a randomly initialised 8x8 UNet2DModel (its samples are noise: what
is checked here is the plumbing, not the quality).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pd_core import kinds
from tests.diffusers_models import save_teacher
from tests.pipeline.helpers import assert_one_line_error, children_of, is_png, mlflow_client, run_pd

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

NAME = "difftest"
REPO = Path(__file__).resolve().parents[2]
FAST = ["--set", "eval.num_samples=100", "--set", "eval.batch_size=100", "--set", "eval.kid_subset_size=50",
        "--set", "eval.stochastic_gammas=[]", "--set", "distill.updates_per_round=10",
        "--set", "distill.checkpoint_every=5"]


@pytest.fixture(scope="module")
def run(prefect_api: str, tmp_path_factory: pytest.TempPathFactory):
    """The pipeline run twice with the same arguments: (home, store root, tracking URI, first, second, env)."""
    home = tmp_path_factory.mktemp("pd-home")
    folder = save_teacher(home / "my-model", prediction_type="epsilon", beta_schedule="scaled_linear")
    root, tracking = home / "store", f"sqlite:///{home / 'mlflow.db'}"
    env = {"PD_HOME": str(home), "PREFECT_API_URL": prefect_api}
    args = ["run", "--preset", "smoke", "--name", NAME, "--teacher-uri", f"diffusers:{folder}", "--storage",
            str(root), "--tracking-uri", tracking, *FAST]
    first = run_pd(*args, cwd=home, env=env)
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
    second = run_pd(*args, cwd=home, env=env)
    assert second.returncode == 0, f"{second.stdout}\n{second.stderr}"
    return home, root, tracking, first, second, env


def _manifest(root: Path, key: str) -> dict:
    return json.loads((root / "pipelines" / NAME / key / "manifest.json").read_text())


def test_the_flow_imports_distills_evaluates_tracks_and_reports(run):
    home, root, tracking, first, _, _ = run
    teacher = _manifest(root, "teacher")
    assert teacher["diffusers_unet2d"]["sample_size"] == 8 and teacher["parameterization"] == "eps"
    for key, steps in [("rounds/01-0004", 4), ("rounds/02-0002", 2), ("rounds/03-0001", 1)]:
        student = _manifest(root, key)
        assert student["steps"] == steps and student["diffusers_unet2d"] is not None
        assert student["parameterization"] == kinds.EPS_TEACHER_STUDENT  # auto for an eps teacher
        assert is_png(root / "pipelines" / NAME / f"{key}.eval" / f"grid-ddim-{steps:04d}.png")
    assert "      1 step  " in first.stdout and "teacher" in first.stdout  # the 1-step student's line
    report = (root / "pipelines" / NAME / "report" / "quality.csv").read_text()
    assert "teacher_ddim" in report and "distilled" in report
    client = mlflow_client(tracking)
    parent = client.search_runs([client.get_experiment_by_name("progressive-distillation").experiment_id],
                                filter_string=f"tags.`pd.pipeline` = '{NAME}' and tags.`pd.kind` = 'pipeline'",
                                order_by=["attributes.start_time ASC"])[0]
    children = children_of(client, parent.info.run_id)
    assert set(children) == {f"{NAME}/teacher", f"{NAME}/round-01-8to4", f"{NAME}/round-02-4to2",
                             f"{NAME}/round-03-2to1"}
    assert "fd_digits" in children[f"{NAME}/round-03-2to1"].data.metrics
    assert client.get_model_version_by_alias(f"pd-{NAME}", "final") is not None


def test_a_rerun_trains_nothing(run):
    _, root, tracking, _, second, _ = run
    client = mlflow_client(tracking)
    experiment = client.get_experiment_by_name("progressive-distillation").experiment_id
    parents = client.search_runs([experiment], filter_string=f"tags.`pd.pipeline` = '{NAME}' and "
                                                              f"tags.`pd.kind` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    children = children_of(client, parents[1].info.run_id)
    assert {name: run.data.tags["skipped"] for name, run in children.items()} == {
        f"{NAME}/{child}": "true" for child in ("teacher", "round-01-8to4", "round-02-4to2", "round-03-2to1")}
    assert not any("train_seconds" in run.data.metrics for run in children.values())


def test_the_registered_student_samples_and_exports_from_mlflow(run):
    home, _, tracking, _, _, env = run
    model = f"models:/pd-{NAME}@final"
    grid = home / "grid.png"
    sample = run_pd("sample", "--model", model, "--num", "4", "--out", str(grid), "--tracking-uri", tracking,
                    cwd=home, env=env)
    assert sample.returncode == 0, sample.stderr
    assert is_png(grid)
    out = home / "exported"
    export = run_pd("export", "--model", model, "--format", "diffusers", "--out", str(out), "--tracking-uri",
                    tracking, cwd=home, env=env)
    assert export.returncode == 0, export.stderr
    assert json.loads((out / "pd_sampler.json").read_text())["steps"] == 1


def test_the_registered_student_predicts_through_mlflow_pyfunc(run, monkeypatch):
    _, _, tracking, _, _, _ = run
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # Through the environment only, undone after the test (mlflow.set_*_uri would leave global state behind).
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking)
    images = mlflow.pyfunc.load_model(f"models:/pd-{NAME}@final").predict({"num_images": 3, "seed": 1})
    assert images.shape == (3, 8, 8, 1) and str(images.dtype) == "uint8"


def test_a_bad_diffusers_folder_fails_before_anything_starts_with_one_line(tmp_path, prefect_api):
    folder = save_teacher(tmp_path / "model", num_train_timesteps=4)  # 4 timesteps: the smoke preset starts at 8
    env = {"PD_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_api}
    proc = run_pd("run", "--preset", "smoke", "--name", "bad", "--teacher-uri", f"diffusers:{folder}", "--storage",
                  str(tmp_path / "store"), cwd=tmp_path, env=env)
    assert_one_line_error(proc, code=2, mentions="set distill.start_steps to at most 4")
    assert not (tmp_path / "store").exists()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    proc = run_pd("run", "--preset", "smoke", "--name", "bad", "--teacher-uri", f"diffusers:{folder}", "--storage",
                  str(tmp_path / "store"), "--set", "distill.start_steps=4", cwd=tmp_path, env=env)
    assert_one_line_error(proc, code=2, mentions="is a pickle")
