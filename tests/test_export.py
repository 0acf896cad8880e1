"""``pd export``: a student as a diffusers folder the stock ``DDIMPipeline`` samples like ``pd sample``
(tests/test_export_stock.py), and the whole N-step sampler as one ONNX graph that onnxruntime runs to within
1e-4 of ``pd sample`` on the same noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.sampling import sample_images
from pd_core import jobs, kinds
from pd_core.config import load_config
from pd_core.export.files import ExportError
from pd_core.export.to_diffusers import export_diffusers
from pd_core.export.to_onnx import export_onnx
from pd_core.models import load_model
from pd_core.store import CheckpointStore
from tests.diffusers_models import distilled_chain
from tests.pipeline.helpers import assert_one_line_error, run_pd

ort = pytest.importorskip("onnxruntime")
README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A diffusers eps teacher distilled 16 -> 8 -> 4 -> 2 -> 1 (v students) through the jobs."""
    return distilled_chain(tmp_path_factory.mktemp("export-chain"), start_steps=16)


@pytest.fixture(scope="module")
def own_unet_student(tmp_path_factory):
    """A smoke-preset student of our own U-Net (a few updates: only the plumbing matters here)."""
    root = tmp_path_factory.mktemp("own")
    cfg = load_config(preset="smoke", overrides=[f"storage.root={root / 'store'}", "teacher.updates=3",
                                                 "distill.updates_per_round=2", "distill.start_steps=4"])
    store = CheckpointStore(cfg.storage.root)
    teacher = jobs.ensure_teacher(cfg, store)
    return store, jobs.run_round(cfg, store, round_index=1, teacher=teacher)


def pd_sample(store: CheckpointStore, key: str, *, num: int, steps: int | None = None, seed: int = 0) -> torch.Tensor:
    """What ``pd sample --num NUM --seed SEED`` draws (before the PNG), on the CPU."""
    loaded = load_model(store, key)
    return sample_images(loaded, steps=steps or loaded.steps, num=num, sampler="ddim", gamma=0.0, seed=seed,
                         batch_size=256, device=torch.device("cpu"))


def _run_onnx(path: Path, noise: torch.Tensor, labels: torch.Tensor | None = None,
              guidance: torch.Tensor | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"noise": noise.numpy()}
    if labels is not None:
        feeds["labels"] = labels.numpy()
    if guidance is not None:
        feeds["guidance"] = guidance.numpy()
    return session.run(["images"], feeds)[0]


@pytest.mark.parametrize("round_index", [1, 3])
def test_onnxruntime_runs_the_exported_sampler_of_a_diffusers_student_like_pd_sample(chain, tmp_path, round_index):
    _, store, infos = chain
    student = infos[round_index]
    path = export_onnx(load_model(store, student.key), out=str(tmp_path / "sampler.onnx"))
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # pd sample's noise for seed 0
    got = _run_onnx(path, noise)  # a batch of 5: the batch dimension is dynamic (exported with 2)
    np.testing.assert_allclose(got, pd_sample(store, student.key, num=5).numpy(), rtol=0, atol=1e-4)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["pd.steps"] == str(student.steps) and meta["pd.parameterization"] == kinds.EPS_TEACHER_STUDENT


def test_onnxruntime_runs_the_exported_sampler_of_our_own_unet_like_pd_sample(own_unet_student, tmp_path):
    store, student = own_unet_student
    for steps in (student.steps, 4):
        path = export_onnx(load_model(store, student.key), out=str(tmp_path / f"s{steps}.onnx"), steps=steps)
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        want = pd_sample(store, student.key, num=3, steps=steps)
        np.testing.assert_allclose(_run_onnx(path, noise), want.numpy(), rtol=0, atol=1e-4)


def test_a_class_conditional_student_exports_to_onnx_with_a_labels_input(tmp_path):
    _, store, infos = distilled_chain(tmp_path, start_steps=2, classes=10)
    loaded = load_model(store, infos[1].key)
    path = export_onnx(loaded, out=str(tmp_path / "cond.onnx"))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])  # what pd sample draws: classes in order
    want = pd_sample(store, infos[1].key, num=4)
    np.testing.assert_allclose(_run_onnx(path, noise, labels), want.numpy(), rtol=0, atol=1e-4)


def test_a_guided_student_exports_to_onnx_with_labels_and_guidance_inputs(tmp_path):
    """A net with a guidance embedding (guided distillation) takes w per image, as pd sample --guidance gives it."""
    from flows.sampling import sample_labels
    from pd_core.lineage import teacher_lineage
    from pd_core.schedule import COSINE
    from pd_core.unet import UNet, UNetSpec

    spec = UNetSpec(in_channels=1, out_channels=1, image_size=8, ch=8, emb_ch=16, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(), norm_groups=4, dropout=0.0, num_classes=3, null_class=True,
                    guidance_embedding=True)
    torch.manual_seed(0)
    tensors = {k: v + 0.1 * torch.randn_like(v) for k, v in UNet(spec).state_dict().items()}
    cfg = load_config(preset="smoke")
    store = CheckpointStore(str(tmp_path / "store"))
    manifest = jobs._manifest(cfg, kind="guided_student", spec=spec, steps=2, round_index=0,  # noqa: SLF001
                              lineage_=teacher_lineage(cfg), schedule=COSINE)
    store.save_checkpoint("pipelines/g/guided", tensors=tensors, manifest=manifest)
    loaded = load_model(store, "pipelines/g/guided")
    path = export_onnx(loaded, out=str(tmp_path / "guided.onnx"))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = sample_labels(loaded, num=3, label=None, guidance=1.5)
    want = sample_images(loaded, steps=2, num=3, sampler="ddim", gamma=0.0, seed=0, batch_size=3,
                         device=torch.device("cpu"), labels=labels, guidance=1.5)
    got = _run_onnx(path, noise, labels, torch.full((3,), 1.5))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_export_refuses_what_it_cannot_write_with_one_line(chain, own_unet_student, tmp_path):
    _, store, infos = chain
    own_store, own = own_unet_student
    with pytest.raises(ExportError, match="the project's own U-Net, which UNet2DModel cannot load; export it with "
                                          "--format onnx"):
        export_diffusers(load_model(own_store, own.key), out=str(tmp_path / "x"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_diffusers(load_model(store, infos[1].key), out=str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="--steps must be an integer between 1 and 64"):
        export_onnx(load_model(store, infos[1].key), out=str(tmp_path / "big.onnx"), steps=65)
    with pytest.raises(ExportError, match="written to a local path"):
        export_onnx(load_model(store, infos[1].key), out="s3://bucket/x.onnx")
    assert not list(tmp_path.glob(".*partial*"))


def test_pd_export_writes_both_formats_and_bad_arguments_exit_2_with_one_line(chain, tmp_path):
    _, store, infos = chain
    uri = infos[-1].uri  # the 1-step student
    ok = run_pd("export", "--model", uri, "--format", "diffusers", "--out", str(tmp_path / "d"), cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "wrote a diffusers folder" in ok.stdout and (tmp_path / "d" / "unet" / "config.json").is_file()
    assert "num_inference_steps=1" in ok.stdout and "# A 1-step sampler" in ok.stdout  # the model card, printed
    ok = run_pd("export", "--model", uri, "--format", "onnx", "--out", str(tmp_path / "s.onnx"), cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "s.onnx").is_file()
    again = run_pd("export", "--model", uri, "--format", "onnx", "--out", str(tmp_path / "s.onnx"), cwd=REPO)
    assert_one_line_error(again, code=2, mentions="already exists")
    wrong = run_pd("export", "--model", uri, "--format", "tflite", "--out", str(tmp_path / "t"), cwd=REPO)
    assert_one_line_error(wrong, code=2, mentions="--format")
