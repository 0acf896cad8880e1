"""The guided-distillation settings: one-line errors naming the field, presets, and hashes that leave the new
fields out while they are off (checkpoints and evaluation records made without them keep their hash)."""

from __future__ import annotations

import hashlib
import json

import pytest

from pd_core.config import ConfigError, load_config

GUIDED = ("smoke-guided", "fmnist-guided-cpu", "fmnist-guided-gpu")


def _error(*overrides: str, preset: str = "smoke") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset=preset, overrides=list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", GUIDED)
def test_guided_presets_validate_and_need_a_null_class(name):
    cfg = load_config(preset=name)
    assert cfg.model.class_conditional and cfg.teacher.label_dropout > 0 and cfg.guidance.enabled
    assert cfg.guidance.w_min <= min(w for w in cfg.eval.guidance_weights if w > 0)
    assert max(cfg.eval.guidance_weights) <= cfg.guidance.w_max
    students = {s for _, s in cfg.distill.rounds()} | {cfg.distill.start_steps}  # stage 1 samples in start_steps
    assert {8, 4, 2, 1} <= students  # the students the benchmark compares


@pytest.mark.parametrize("overrides,field", [
    (["teacher.label_dropout=0.1"], "teacher.label_dropout"),
    (["guidance.enabled=true"], "guidance.enabled"),
    (["guidance.enabled=true", "model.class_conditional=true"], "guidance.enabled"),
    (["eval.guidance_weights=[0, 1.5]"], "eval.guidance_weights"),
    (["eval.guidance_weights=[0, 1.5]", "model.class_conditional=true"], "eval.guidance_weights"),
    (["guidance.w_min=3", "guidance.w_max=2"], "guidance.w_max"),
    (["guidance.w_max=101"], "guidance.w_max"),
    (["guidance.w_min=-1"], "guidance.w_min"),
    (["eval.guidance_weights=[]"], "eval.guidance_weights"),
    (["eval.guidance_weights=[0, 0]"], "eval.guidance_weights"),
    (["eval.guidance_weights=[-0.5]"], "eval.guidance_weights"),
    (["eval.guidance_weights=[" + ", ".join(str(i) for i in range(17)) + "]"], "eval.guidance_weights"),
    (["teacher.label_dropout=1.0", "model.class_conditional=true"], "teacher.label_dropout"),
    (["guidance.updates=0"], "guidance.updates"),
])
def test_guidance_settings_that_cannot_work_are_refused_naming_the_field(overrides, field):
    assert field in _error(*overrides)


def test_an_imported_teacher_may_bring_its_null_class():
    cfg = load_config(preset="smoke", overrides=["model.class_conditional=true", "guidance.enabled=true",
                                                 "eval.guidance_weights=[0, 2]",
                                                 "pipeline.teacher_uri=file:///runs/store/pipelines/x/teacher"])
    assert cfg.guidance.enabled and cfg.teacher.label_dropout == 0


def _independent_hash(cfg, sections, *, drop: dict[str, str]) -> str:
    dump = cfg.model_dump(mode="json")
    picked = {s: {k: v for k, v in dump[s].items() if drop.get(s) != k} for s in sections}
    text = json.dumps(picked, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def test_configs_without_guidance_hash_as_if_the_guidance_fields_did_not_exist():
    """Lineage settings (what a checkpoint's settings_hash covers) and evaluation hashes leave the guidance fields
    out while they are off, so checkpoints and records made before guided distillation keep their hashes."""
    from pd_core import evaluation, lineage

    cfg = load_config(preset="fmnist-cpu")
    teacher = lineage.teacher_lineage(cfg)
    assert "label_dropout" not in teacher.settings["teacher"] and "guidance" not in teacher.settings
    dump = cfg.model_dump(mode="json")
    before = {k: v for k, v in dump["teacher"].items() if k not in ("log_every", "checkpoint_every", "seed",
                                                                       "label_dropout")}
    assert teacher.settings["teacher"] == before
    assert teacher.settings_hash == lineage.settings_hash(teacher.settings)
    round_one = lineage.round_lineage(cfg, round_index=1, teacher_steps=cfg.distill.start_steps, parent_sha256="ab")
    assert "guidance" not in round_one.settings
    assert evaluation.eval_hash(cfg) == _independent_hash(cfg, ("data", "eval"),
                                                          drop={"eval": "guidance_weights"})[:12]


def test_guidance_settings_change_the_hashes_once_they_are_used():
    from pd_core import evaluation, lineage

    guided = load_config(preset="smoke-guided")
    teacher = lineage.teacher_lineage(guided)
    assert teacher.settings["teacher"]["label_dropout"] == guided.teacher.label_dropout

    def stage_one(cfg):
        return lineage.guided_lineage(cfg, teacher_steps=cfg.distill.start_steps, parent_sha256="ab").settings_hash

    other_w = load_config(preset="smoke-guided", overrides=["guidance.w_max=3"])
    assert stage_one(other_w) != stage_one(guided)
    assert lineage.teacher_lineage(other_w).settings_hash == teacher.settings_hash  # the teacher is kept
    other_embedding_lr = load_config(preset="smoke-guided", overrides=["guidance.embedding_lr_scale=5"])
    assert stage_one(other_embedding_lr) != stage_one(guided)
    assert lineage.guided_lineage(other_embedding_lr, teacher_steps=8, parent_sha256="ab").settings["guidance"][
        "embedding_lr_scale"] == 5.0
    other_dropout = load_config(preset="smoke-guided", overrides=["teacher.label_dropout=0.3"])
    assert lineage.teacher_lineage(other_dropout).settings_hash != teacher.settings_hash
    stage_two = [lineage.round_lineage(cfg, round_index=1, teacher_steps=8, parent_sha256="ab",
                                       guidance_range=(cfg.guidance.w_min, cfg.guidance.w_max))
                 for cfg in (guided, other_w)]
    assert stage_two[0].settings["guidance"] == {"w_min": 0.0, "w_max": 2.0}
    assert stage_two[0].settings_hash != stage_two[1].settings_hash
    other_eval = load_config(preset="smoke-guided", overrides=["eval.guidance_weights=[0, 2]"])
    assert evaluation.eval_hash(other_eval) != evaluation.eval_hash(guided)


@pytest.mark.parametrize("args,mentions", [
    (["sample", "--model", "file:///nowhere/teacher", "--guidance", "-1"], "--guidance: must be a weight in [0, 100]"),
    (["sample", "--model", "file:///nowhere/teacher", "--guidance", "nan"], "--guidance: must be a weight"),
    (["sample", "--model", "file:///nowhere/teacher", "--label", "x"], "--label: invalid int value"),
    (["eval", "--model", "file:///nowhere/teacher", "--guidance", "1e9"], "--guidance: must be a weight"),
])
def test_bad_guidance_arguments_exit_2_with_one_line(tmp_path, args, mentions):
    from tests.pipeline.helpers import assert_one_line_error, run_pd

    assert_one_line_error(run_pd(*args, cwd=tmp_path, env={"PD_HOME": str(tmp_path / "home")}), code=2,
                          mentions=mentions)
