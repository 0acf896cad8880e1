"""The guide-distill job (stage 1) over a real local store: it starts as the teacher, resumes exactly, is skipped
when complete, refuses other settings and unconditional teachers, feeds stage 2, and runs under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pd_core import jobs, launch
from pd_core.config import load_config
from pd_core.models import load_model
from pd_core.store import CheckpointStore
from pd_core.train import NonFiniteLossError


def _cfg(tmp_path: Path, name: str, *overrides: str, preset: str = "smoke-guided"):
    return load_config(preset=preset, overrides=[
        f"pipeline.name={name}", f"storage.root={tmp_path / 'store'}", "teacher.updates=6", "teacher.log_every=3",
        "teacher.checkpoint_every=100", "guidance.updates=8", "guidance.log_every=2", "guidance.checkpoint_every=4",
        "guidance.batch_size=16", "distill.updates_per_round=4", "distill.log_every=2", "distill.batch_size=16",
        "eval.enabled=false", *overrides])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guided-jobs")
    cfg = _cfg(tmp, "g")
    store = CheckpointStore(cfg.storage.root)
    return tmp, store, jobs.ensure_teacher(cfg, store)


def test_the_stage_one_student_starts_as_the_teachers_conditional_model(teacher):
    """The student as built, before its first update: the teacher's conditional output at every w."""
    from pd_core.train import new_guided_student_state, resolve_runtime

    tmp, store, info = teacher
    cfg = _cfg(tmp, "g")
    weights, _ = store.load_checkpoint(info.key)
    loaded = load_model(store, info.key)
    assert loaded.architecture.null_class and not loaded.architecture.guidance_embedding
    state = new_guided_student_state(teacher_weights=weights, arch=loaded.architecture.with_guidance_embedding(),
                                     distill_cfg=cfg.distill, guidance_cfg=cfg.guidance,
                                     runtime=resolve_runtime(cfg.runtime), seed=0)
    student = state.model.eval()
    z, lam, y = torch.randn(4, 1, 8, 8), torch.tensor([-3.0, 0.0, 2.0, 6.0]), torch.tensor([0, 3, 7, 9])
    want = loaded.denoiser.net(z, lam, y)
    for w in (0.0, 1.5):
        assert torch.equal(student(z, lam, y, torch.full((4,), w)), want)


def test_stage_one_resumes_to_the_weights_of_an_uninterrupted_run(teacher):
    tmp, store, info = teacher
    straight = jobs.run_guide_distill(_cfg(tmp, "g"), store, teacher=info)
    assert straight.trained and straight.steps == 8 and straight.round == 0
    cfg = _cfg(tmp, "g-killed")
    with pytest.raises(NonFiniteLossError):
        jobs.run_guide_distill(cfg, store, teacher=info, fault_at_step=5)  # after the checkpoint at update 4
    resumed = jobs.run_guide_distill(cfg, store, teacher=info)
    assert resumed.resumed_from == 4 and resumed.sha256 == straight.sha256
    again = jobs.run_guide_distill(_cfg(tmp, "g"), store, teacher=info)
    assert not again.trained and again.sha256 == straight.sha256
    manifest = store.read_manifest(straight.key)
    assert manifest["kind"] == "guided_student" and manifest["parent_sha256"] == info.sha256
    assert manifest["unet"]["guidance_embedding"] and manifest["unet"]["dropout"] == 0.0


def test_stage_two_rounds_keep_the_w_input_and_other_settings_are_refused(teacher):
    tmp, store, info = teacher
    cfg = _cfg(tmp, "g")
    guided = jobs.run_guide_distill(cfg, store, teacher=info)
    student = jobs.run_round(cfg, store, round_index=1, teacher=guided)
    manifest = store.read_manifest(student.key)
    assert manifest["unet"]["guidance_embedding"] and manifest["parent_sha256"] == guided.sha256
    with pytest.raises(jobs.PipelineMismatchError, match=r"guidance\.w_max 2\.0 -> 3\.0; settings hash"):
        jobs.run_guide_distill(_cfg(tmp, "g", "guidance.w_max=3"), store, teacher=info)


def test_an_unconditional_teacher_is_refused_in_one_line(tmp_path):
    cfg = _cfg(tmp_path, "plain", preset="smoke")
    store = CheckpointStore(cfg.storage.root)
    plain = jobs.ensure_teacher(cfg, store)
    with pytest.raises(jobs.PipelineMismatchError, match="not a class-conditional teacher with a null class") as err:
        jobs.run_guide_distill(cfg, store, teacher=plain)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_stage_one_reports_progress_and_checkpoints_on_rank_zero(tmp_path):
    cfg = _cfg(tmp_path, "g-ddp", "runtime.nproc=2")
    store = CheckpointStore(cfg.storage.root)
    info = jobs.ensure_teacher(cfg, store)
    events, lines = [], []
    guided = launch.launch_job(cfg, job="guide", teacher=info, on_progress=events.append, log_line=lines.append)
    assert guided.trained and guided.steps == 8 and store.is_complete(guided.key)
    assert [e.step for e in events] == [2, 4, 6, 8] and all(e.phase == "guide-distill" for e in events)
    assert any("effective batch 32 = 16 per process x 2 process(es)" in line for line in lines), lines
    assert store.load_state(jobs.state_key(guided.key)) is None
    with pytest.raises(ValueError, match="job='guide' needs teacher"):
        launch.launch_job(cfg, job="guide")
