"""``pd run --teacher-uri diffusers:<Stable Diffusion-style folder>``: import, encode once, stage 1, rounds, MLflow,
report through Prefect; a rerun trains and encodes nothing; hostile folders and mismatched data fail before anything
starts with one line.

Real parts only: the ``pd`` console script in a subprocess, the Prefect test server, MLflow on a sqlite file, a
local store. The teacher is the tiny randomly initialised pipeline of tests/sd_models.py and the data a 12-image
imagefolder written here: the plumbing is checked, not the quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pd_core import kinds
from tests.pipeline.helpers import assert_one_line_error, children_of, mlflow_client, run_pd
from tests.sd_models import saved_sd_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

NAME = "t2itest"
PROMPTS = ("a photo of a bag", "a photo of a coat", "")
TINY = ["--set", "data.name=captions", "--set", "data.image_size=8", "--set", "diffusion.weighting=snr_plus_one",
        "--set", "distill.start_steps=2", "--set", "distill.updates_per_round=2", "--set", "distill.batch_size=4",
        "--set", "distill.checkpoint_every=1"]
GUIDED = ["--set", "guidance.enabled=true", "--set", "guidance.updates=3", "--set", "guidance.batch_size=4",
          "--set", "guidance.w_max=2.0"]
EVAL = ["--set", "eval.num_samples=12", "--set", "eval.batch_size=12", "--set", "eval.kid_subset_size=6",
        "--set", "eval.kid_subsets=2", "--set", "eval.classifier_epochs=1", "--set", "eval.grid_size=2",
        "--set", "eval.class_names=[bag, coat]", "--set", "eval.guidance_weights=[0, 2]"]


def write_captions(folder: Path) -> Path:
    """12 random 8x8 RGB images captioned with PROMPTS in turn (one in three empty), as an imagefolder."""
    from pd_core.data.class_captions import write_caption_folder

    images = torch.randint(0, 256, (12, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_caption_folder(images, [PROMPTS[i % 3] for i in range(12)], str(folder))
    return folder


@pytest.fixture(scope="module")
def run(prefect_api: str, tmp_path_factory: pytest.TempPathFactory):
    """The guided pipeline run twice with the same arguments: (home, store root, tracking URI, first, second)."""
    home = tmp_path_factory.mktemp("pd-home")
    folder = shutil.copytree(saved_sd_pipeline(), home / "my-pipeline")
    data = write_captions(home / "captions")
    root, tracking = home / "store", f"sqlite:///{home / 'mlflow.db'}"
    env = {"PD_HOME": str(home), "PREFECT_API_URL": prefect_api}
    args = ["run", "--preset", "smoke", "--name", NAME, "--teacher-uri", f"diffusers:{folder}", "--storage",
            str(root), "--tracking-uri", tracking, "--set", f"data.url={data}", *TINY, *GUIDED, *EVAL]
    first = run_pd(*args, cwd=home, env=env)
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
    second = run_pd(*args, cwd=home, env=env)
    assert second.returncode == 0, f"{second.stdout}\n{second.stderr}"
    return home, root, tracking, first, second


def _manifest(root: Path, key: str) -> dict:
    return json.loads((root / "pipelines" / NAME / key / "manifest.json").read_text())


def test_the_flow_imports_encodes_once_runs_stage_1_and_the_rounds_and_evaluates_and_tracks_them(run):
    home, root, tracking, first, _ = run
    from pd_core.interop.sd_folder import component_hashes, read_text_to_image, source_sha256

    teacher = _manifest(root, "teacher")
    source = source_sha256(component_hashes(read_text_to_image(str(home / "my-pipeline"))))
    assert teacher["parent_sha256"] == source and teacher["parameterization"] == "eps"
    assert teacher["diffusers_unet2d_condition"]["time_cond_proj_dim"] is None
    pointer = json.loads((root / "pipelines" / NAME / "encoded-data.json").read_text())
    assert pointer["count"] == 12 and pointer["captions"] == 3 and (root / pointer["key"] / "manifest.json").exists()
    guided = _manifest(root, "guided")
    assert guided["diffusers_unet2d_condition"]["time_cond_proj_dim"] == 256  # diffusers' guidance embedding
    assert guided["parameterization"] == "eps" and guided["parent_sha256"] == teacher["sha256"]
    assert guided["settings"]["encoded_data"] == pointer["sha256"] and guided["settings"]["teacher_folder"] == source
    student = _manifest(root, "rounds/01-0001")
    assert student["steps"] == 1 and student["parent_sha256"] == guided["sha256"]
    assert student["parameterization"] == kinds.EPS_TEACHER_STUDENT  # auto for an eps teacher
    assert student["w_max"] == 2.0 and student["diffusers_unet2d_condition"]["time_cond_proj_dim"] == 256
    assert student["text_to_image"] == teacher["text_to_image"]  # it samples and exports on its own
    assert "      1 step  " in first.stdout
    report = (root / "pipelines" / NAME / "report" / "quality.csv").read_text()
    for name in ("teacher_ddim", "diffusers_ddim", "distilled", "fd_captions", "prompt_accuracy", "unet_calls"):
        assert name in report, name
    assert (root / "pipelines" / NAME / "rounds/01-0001.eval" / "samples-ddim-0001-w2.png").exists()
    client = mlflow_client(tracking)
    runs = client.search_runs([client.get_experiment_by_name("progressive-distillation").experiment_id],
                              filter_string=f"tags.`pd.pipeline` = '{NAME}' and tags.`pd.kind` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])
    children = children_of(client, runs[0].info.run_id)
    assert set(children) == {f"{NAME}/{c}" for c in ("teacher", "guide-distill", "round-01-2to1")}
    metrics = children[f"{NAME}/round-01-2to1"].data.metrics
    assert {"fd_captions_w0", "fd_captions_w2", "prompt_accuracy_w2", "unet_calls_w2"} <= set(metrics)
    teacher_metrics = children[f"{NAME}/teacher"].data.metrics
    assert {"ddim_fd_captions_w2_1steps", "diffusers_ddim_fd_captions_w2_2steps"} <= set(teacher_metrics)


def test_a_rerun_trains_and_encodes_nothing(run):
    _, _, tracking, _, second = run
    client = mlflow_client(tracking)
    parents = client.search_runs([client.get_experiment_by_name("progressive-distillation").experiment_id],
                                 filter_string=f"tags.`pd.pipeline` = '{NAME}' and tags.`pd.kind` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    children = children_of(client, parents[1].info.run_id)
    assert {name: r.data.tags["skipped"] for name, r in children.items()} == {
        f"{NAME}/{c}": "true" for c in ("teacher", "guide-distill", "round-01-2to1")}
    assert not any("train_seconds" in r.data.metrics for r in children.values())
    out = second.stdout + second.stderr
    assert "3 distinct captions (reused)" in out and "encoded now" not in out


def test_a_pickle_only_component_or_data_not_captions_or_without_metadata_fails_before_anything_starts(tmp_path,
                                                                                                        prefect_api):
    folder = shutil.copytree(saved_sd_pipeline(), tmp_path / "pipe")
    env = {"PD_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_api}
    base = ["run", "--preset", "smoke", "--name", "bad", "--teacher-uri", f"diffusers:{folder}", "--storage",
            str(tmp_path / "store")]
    proc = run_pd(*base, "--set", "distill.start_steps=4", cwd=tmp_path, env=env)  # data.name digits
    assert_one_line_error(proc, code=2, mentions="data.name must be 'captions'")
    proc = run_pd(*base, *TINY, *EVAL, "--set", f"data.url={tmp_path / 'no-data'}", cwd=tmp_path, env=env)
    assert_one_line_error(proc, code=2, mentions="data.url: ")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    proc = run_pd(*base, *TINY, *EVAL, "--set", f"data.url={tmp_path}", cwd=tmp_path, env=env)
    assert_one_line_error(proc, code=2, mentions="vae: ")
    assert "is a pickle" in proc.stderr
    assert not (tmp_path / "store").exists()
