"""Students of imported diffusers teachers: the teacher's architecture, their own parameterization, stored like
every checkpoint (safetensors + a manifest that rebuilds them), loaded by pd_core.models, resumable and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pd_core import jobs, kinds, samplers
from pd_core.config import DiffusionConfig
from pd_core.denoiser import Denoiser
from pd_core.distill import DistillationLoss
from pd_core.models import load_model
from pd_core.train import distill_loss_fn
from tests.diffusers_models import distilled_chain, tiny_unet


@pytest.mark.parametrize(("requested", "teacher", "student"), [
    ("auto", "eps", kinds.EPS_TEACHER_STUDENT), ("auto", "x", "x"), ("auto", "v", "v"), ("auto", "both", "both"),
    ("v", "eps", "v"), ("eps", "x", "eps"), ("x", "v", "x"), ("both", "both", "both")])
def test_the_student_parameterization_is_the_requested_one_or_the_teachers(requested, teacher, student):
    assert kinds.student_parameterization(requested=requested, teacher=teacher) == student


@pytest.mark.parametrize(("requested", "teacher"), [("both", "eps"), ("x", "both"), ("bogus", "eps")])
def test_a_student_that_cannot_be_a_copy_of_its_teacher_is_refused(requested, teacher):
    with pytest.raises(ValueError, match="distill.student_parameterization"):
        kinds.student_parameterization(requested=requested, teacher=teacher)


def test_the_eps_teacher_default_is_a_parameterization_that_does_not_divide_by_alpha():
    # what RESULTS.md measured best for students of an eps teacher at 1-2 steps (benchmarks/your_model)
    assert kinds.EPS_TEACHER_STUDENT in ("x", "v")


def test_teacher_and_student_read_the_network_output_with_their_own_parameterizations():
    from pd_core.interop.diffusers import DiffusersUNetNet
    from pd_core.schedule import DiscreteSchedule, ddpm_alphas_cumprod

    sched = DiscreteSchedule(ddpm_alphas_cumprod(beta_schedule="linear"))
    teacher = DiffusersUNetNet(tiny_unet(seed=1), schedule=sched).eval()
    student = DiffusersUNetNet(tiny_unet(seed=2), schedule=sched)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    cfg = DiffusionConfig(parameterization="x", weighting="snr_trunc")
    got = distill_loss_fn(net=student, teacher_net=teacher, student_steps=2, diffusion_cfg=cfg, schedule=sched,
                          generator=torch.Generator().manual_seed(3), teacher_parameterization="eps",
                          student_parameterization="v")(x, None)
    loss = DistillationLoss(Denoiser(teacher, parameterization="eps"), num_steps=2, weighting="snr_trunc",
                            schedule=sched)
    want = loss(Denoiser(student, parameterization="v"), x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    as_x = distill_loss_fn(net=student, teacher_net=teacher, student_steps=2, diffusion_cfg=cfg, schedule=sched,
                           generator=torch.Generator().manual_seed(3), teacher_parameterization="eps",
                           student_parameterization="x")(x, None)
    assert not torch.allclose(as_x, got)  # the parameterization reaches the loss


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return distilled_chain(tmp_path_factory.mktemp("chain"))


def test_students_of_a_diffusers_teacher_keep_its_unet2dmodel_and_record_what_rebuilds_them(chain):
    cfg, store, infos = chain
    teacher = store.read_manifest(infos[0].key)
    assert [i.steps for i in infos] == [8, 4, 2, 1]
    for info in infos[1:]:
        manifest = store.read_manifest(info.key)
        assert manifest["unet"] is None and manifest["schedule"] == teacher["schedule"]
        assert manifest["diffusers_unet2d"] == {**teacher["diffusers_unet2d"], "dropout": 0.0}
        assert manifest["diffusers_scheduler"] == teacher["diffusers_scheduler"]
        assert manifest["parameterization"] == kinds.EPS_TEACHER_STUDENT  # auto, for an eps teacher
        json.dumps(manifest)  # plain JSON, nothing else
        folder = Path(store.uri(info.key).removeprefix("file://"))
        assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".safetensors"]
        tensors, _ = store.load_checkpoint(info.key)
        weights, _ = store.load_checkpoint(infos[0].key)
        assert tensors.keys() == weights.keys()  # the same UNet2DModel
        assert any(not torch.equal(tensors[k], weights[k]) for k in tensors)  # trained
    assert store.read_manifest(infos[2].key)["teacher_parameterization"] == kinds.EPS_TEACHER_STUDENT
    assert store.read_manifest(infos[1].key)["teacher_parameterization"] == "eps"


def test_a_student_loads_as_a_sampler_and_samples_finite_images(chain):
    _, store, infos = chain
    loaded = load_model(store, infos[-1].key)
    assert loaded.steps == 1 and loaded.image_shape == (1, 8, 8)
    x = samplers.ddim(loaded.denoiser, torch.randn(4, 1, 8, 8), num_steps=1, schedule=loaded.schedule)
    assert x.shape == (4, 1, 8, 8) and bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1.0


def test_a_rerun_of_a_diffusers_pipeline_trains_nothing(chain):
    cfg, store, infos = chain
    again = [jobs.ensure_teacher(cfg, store)]
    for round_index, _ in enumerate(cfg.distill.rounds(), start=1):
        again.append(jobs.run_round(cfg, store, round_index=round_index, teacher=again[-1]))
    assert [a.sha256 for a in again] == [i.sha256 for i in infos]
    assert not any(a.trained for a in again)


def test_a_finished_student_is_not_reused_for_another_resolved_parameterization(chain, monkeypatch):
    cfg, store, infos = chain
    now = kinds.EPS_TEACHER_STUDENT
    other = "v" if now == "x" else "x"
    monkeypatch.setattr(jobs, "student_parameterization", lambda *, requested, teacher: other)  # auto changed
    with pytest.raises(jobs.PipelineMismatchError, match=f"distill.student_parameterization {now} -> {other}"):
        jobs.run_round(cfg, store, round_index=1, teacher=infos[0])


def test_an_explicit_student_parameterization_is_used_and_recorded(tmp_path):
    _, store, infos = distilled_chain(tmp_path, start_steps=2, overrides=("distill.student_parameterization=v",))
    manifest = store.read_manifest(infos[1].key)
    assert manifest["parameterization"] == "v" and manifest["teacher_parameterization"] == "eps"
    assert load_model(store, infos[1].key).denoiser.parameterization == "v"


def test_a_class_conditional_teacher_is_distilled_with_the_datasets_labels(tmp_path):
    _, store, infos = distilled_chain(tmp_path, start_steps=2, classes=10)
    loaded = load_model(store, infos[1].key)
    assert loaded.num_classes == 10
    y = torch.arange(4)
    x = samplers.ddim(loaded.denoiser.with_labels(y), torch.randn(4, 1, 8, 8), num_steps=1, schedule=loaded.schedule)
    assert bool(torch.isfinite(x).all())


def test_a_class_conditional_teacher_with_fewer_classes_than_the_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="knows 3 classes but the data has label 9"):
        distilled_chain(tmp_path, start_steps=2, classes=3)


def test_a_teacher_is_not_distilled_on_images_of_another_shape(tmp_path):
    with pytest.raises(ValueError, match=r"denoises images of shape \[1, 8, 8\] .* gives \[3, 8, 8\]"):
        distilled_chain(tmp_path, start_steps=2, overrides=("data.name=npz", f"data.url={_rgb_npz(tmp_path)}"))


def _rgb_npz(tmp_path: Path) -> Path:
    import numpy as np

    path = tmp_path / "rgb.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 64), x_test=rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 64))
    return path


def test_evaluation_samples_a_class_conditional_model_with_every_class_in_turn(tmp_path):
    from pd_core import evaluation

    _, store, infos = distilled_chain(tmp_path, start_steps=2, classes=10)
    loaded = load_model(store, infos[1].key)
    sample = evaluation.make_sample_fn(loaded, sampler="ddim", steps=1, gamma=None, seed=0, device=torch.device("cpu"))
    noise = torch.randn(13, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = torch.cat([sample(noise[:8]), sample(noise[8:])])  # two batches of one evaluation
    want = samplers.ddim(loaded.denoiser.with_labels(torch.arange(13) % 10), noise, num_steps=1,
                         schedule=loaded.schedule)
    torch.testing.assert_close(got, want)
