"""Lineage at the jobs level: a checkpoint is reused only when its settings and its parent are this run's.

A student of a replaced teacher, a teacher of another source or seed, an in-round state of other
settings: refused or discarded with one line that says how to go on; ``pipeline.restart_from``
(``pd run --restart-from N``) retrains from round N and keeps what comes before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest

from pd_core import jobs
from pd_core.store import CheckpointStore
from pd_core.train import NonFiniteLossError
from tests.faults.helpers import _cfg, _copy_of, _one_line, _round_key, _state_step, log_lines

RESERVED = ("format", "sha256", "files", "status", "created_at")


def _replace_teacher_weights(store: CheckpointStore) -> str:
    """Save other weights under the teacher's key with the same manifest (a teacher retrained with other
    weights, e.g. on a GPU, or replaced by hand); returns the new sha256."""
    key = jobs.teacher_key("faults")
    tensors, manifest = store.load_checkpoint(key)
    first = next(iter(tensors))
    tensors = {**tensors, first: tensors[first] + 0.01}
    kept = {k: v for k, v in manifest.items() if k not in RESERVED}
    return store.save_checkpoint(key, tensors=tensors, manifest=kept).sha256


def test_a_student_of_a_replaced_teacher_is_refused_then_retrained_by_restart(
        template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    old_teacher = store.read_manifest(jobs.teacher_key("faults"))["sha256"]
    new_teacher_sha = _replace_teacher_weights(store)
    teacher = jobs.ensure_teacher(cfg, store)
    assert not teacher.trained and teacher.sha256 == new_teacher_sha != old_teacher

    with pytest.raises(jobs.PipelineMismatchError) as err:
        jobs.run_round(cfg, store, round_index=1, teacher=teacher)
    message = _one_line(err.value)
    assert message.startswith(f"round 1 (8->4) at {student.uri} was made from another teacher"), message
    assert old_teacher[:12] in message and new_teacher_sha[:12] in message, message
    assert "--restart-from 1" in message and "--name NEW" in message, message
    assert store.read_manifest(student.key)["sha256"] == student.sha256, "a refused checkpoint must stay as it was"

    caplog.set_level(logging.INFO, logger="pd_core")
    again = jobs.run_round(_cfg("faults", "pipeline.restart_from=1"), store, round_index=1, teacher=teacher)
    assert again.trained and again.sha256 != student.sha256
    assert store.read_manifest(student.key)["parent_sha256"] == new_teacher_sha
    assert any("retraining it (--restart-from 1)" in r.getMessage() and student.sha256[:12] in r.getMessage()
               for r in caplog.records)
    assert jobs.run_round(cfg, store, round_index=1, teacher=teacher).trained is False  # now it is this run's


def test_teacher_uri_on_a_complete_pipeline_is_refused_not_ignored(template: Path, tmp_path: Path) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    tensors, manifest = store.load_checkpoint(student.key)  # another teacher, kept in another store
    source = CheckpointStore(str(tmp_path / "elsewhere")).save_checkpoint(
        "teachers/t1", tensors=tensors, manifest={k: v for k, v in manifest.items() if k not in RESERVED})
    other = _cfg("faults", f"pipeline.teacher_uri={source.uri}")
    with pytest.raises(jobs.PipelineMismatchError) as err:
        jobs.ensure_teacher(other, store)
    message = _one_line(err.value)
    assert message.startswith(f"teacher at {store.uri(jobs.teacher_key('faults'))} was made from another source "
                              f"(trained here; pipeline.teacher_uri names sha256 {source.sha256[:12]})"), message
    assert "--restart-from 0" in message, message

    restart = _cfg("faults", f"pipeline.teacher_uri={source.uri}", "pipeline.restart_from=0")
    teacher = jobs.ensure_teacher(restart, store)
    manifest = store.read_manifest(teacher.key)
    assert manifest["parent_sha256"] == source.sha256 and manifest["imported_from"] == source.uri
    assert jobs.run_round(restart, store, round_index=1, teacher=teacher).trained  # its old student goes too
    assert jobs.ensure_teacher(other, store).trained is False  # the import is this pipeline's teacher now


def test_teacher_uri_naming_the_pipelines_own_teacher_reuses_it(template: Path, tmp_path: Path) -> None:
    """What the pd-distill deployment passes after train-teacher: the teacher is used as it is, not re-imported."""
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    own = _cfg("faults", f"pipeline.teacher_uri={store.uri(jobs.teacher_key('faults'))}")
    teacher = jobs.ensure_teacher(own, store)
    assert not teacher.trained and store.read_manifest(teacher.key)["parent_sha256"] is None
    assert jobs.run_round(own, store, round_index=1, teacher=teacher).sha256 == student.sha256


@pytest.mark.parametrize("override, changed", [("pipeline.seed=1", "pipeline.seed 0 -> 1"),
                                               ("teacher.lr=0.002", "teacher.lr 0.001 -> 0.002")])
def test_a_teacher_of_other_settings_is_refused(template: Path, tmp_path: Path, override: str, changed: str) -> None:
    cfg = _cfg("faults")
    store, _ = _copy_of(template, tmp_path, cfg)
    with pytest.raises(jobs.PipelineMismatchError) as err:
        jobs.ensure_teacher(_cfg("faults", override), store)
    message = _one_line(err.value)
    assert f"was made from other settings ({changed}; settings hash " in message, message


def test_settings_that_decide_no_weights_never_invalidate_a_checkpoint(template: Path, tmp_path: Path) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    teacher_sha = store.read_manifest(jobs.teacher_key("faults"))["sha256"]
    # distill.* decides the students, not the teacher; cadences, eval, tracking decide nothing
    teacher = jobs.ensure_teacher(_cfg("faults", "distill.lr=0.001", "teacher.log_every=3",
                                       "teacher.checkpoint_every=7", "eval.seed=5"), store)
    assert not teacher.trained and teacher.sha256 == teacher_sha
    same = _cfg("faults", "distill.log_every=3", "distill.checkpoint_every=7", "eval.kid_subsets=3",
                "tracking.experiment=other", "model.ch=32")  # the student's architecture is its teacher's
    assert jobs.run_round(same, store, round_index=1, teacher=teacher).sha256 == student.sha256
    with pytest.raises(jobs.PipelineMismatchError, match=r"distill\.lr 0\.0005 -> 0\.001"):
        jobs.run_round(_cfg("faults", "distill.lr=0.001"), store, round_index=1, teacher=teacher)


def test_settings_hash_is_sha256_of_the_canonical_json() -> None:
    from pd_core import lineage

    settings = {"b": [1, 2.5], "a": {"y": None, "x": "é"}}
    canonical = '{"a":{"x":"\\u00e9","y":null},"b":[1,2.5]}'
    assert lineage.settings_hash(settings) == hashlib.sha256(canonical.encode()).hexdigest()


def test_lineage_covers_what_decides_the_weights_and_only_that() -> None:
    from pd_core import lineage

    base = _cfg("faults")

    def teacher_hash(*overrides: str, source: str | None = None) -> str:
        return lineage.teacher_lineage(_cfg("faults", *overrides), source_sha256=source).settings_hash

    def round_hash(*overrides: str, round_index: int = 1) -> str:
        return lineage.round_lineage(_cfg("faults", *overrides), round_index=round_index,
                                     teacher_steps=base.distill.start_steps, parent_sha256="ab" * 32).settings_hash

    t0, r0 = teacher_hash(), round_hash()
    for override in ("model.ch=32", "diffusion.weighting=snr", "data.limit=100", "teacher.lr=0.002",
                     "teacher.updates=21", "pipeline.seed=1"):
        assert teacher_hash(override) != t0, override
    assert teacher_hash(source="cd" * 32) != t0
    for override in ("distill.lr=0.001", "distill.batch_size=32", "distill.log_every=3", "eval.seed=5",
                     "teacher.checkpoint_every=3", "teacher.log_every=3", "runtime.threads=2",
                     "storage.root=/elsewhere", "pipeline.name=other", "pipeline.restart_from=1"):
        assert teacher_hash(override) == t0, override
    for override in ("distill.lr=0.001", "distill.batch_size=32", "distill.dropout=0.1", "distill.grad_clip=1.0",
                     "distill.updates_per_round=21", "diffusion.weighting=snr", "data.limit=100", "pipeline.seed=1"):
        assert round_hash(override) != r0, override
    assert round_hash(round_index=2) != r0
    for override in ("distill.log_every=3", "distill.checkpoint_every=3", "model.ch=32", "teacher.lr=0.002",
                     "eval.seed=5", "distill.final_steps=2", "pipeline.name=other"):
        assert round_hash(override) == r0, override
    parent = lineage.round_lineage(base, round_index=1, teacher_steps=8, parent_sha256="cd" * 32)
    assert parent.settings_hash == r0 and parent.parent_sha256 == "cd" * 32


def test_an_in_round_state_of_other_settings_is_discarded_never_resumed(
        template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    key = _round_key(cfg, 2)
    with pytest.raises(NonFiniteLossError):
        jobs.run_round(cfg, store, round_index=2, teacher=student, fault_at_step=7)
    assert _state_step(store, key) == 5
    assert store.read_state_meta(jobs.state_key(key))["lineage"]["parent_sha256"] == student.sha256

    caplog.set_level(logging.INFO, logger="pd_core")
    lower = _cfg("faults", "distill.lr=0.0002", "pipeline.restart_from=2")
    kept = jobs.run_round(lower, store, round_index=1, teacher=jobs.ensure_teacher(lower, store))
    assert not kept.trained and kept.sha256 == student.sha256  # before the restart: kept as it is
    info = jobs.run_round(lower, store, round_index=2, teacher=kept)
    assert info.trained and info.resumed_from == 0
    lines = log_lines(caplog.records, "discarding the in-round state")
    assert len(lines) == 1 and "(update 5)" in lines[0] and "distill.lr 0.0005 -> 0.0002" in lines[0], lines
    assert any("kept as it is (--restart-from 2)" in r.getMessage() for r in caplog.records)
    assert store.read_manifest(key)["settings"]["distill"]["lr"] == 0.0002


def test_a_retraining_in_progress_resumes_where_it_stopped(template: Path, tmp_path: Path) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    new_teacher_sha = _replace_teacher_weights(store)
    teacher = jobs.ensure_teacher(cfg, store)
    restart = _cfg("faults", "pipeline.restart_from=1")
    with pytest.raises(NonFiniteLossError):  # the restarted round is killed after its update-5 state
        jobs.run_round(restart, store, round_index=1, teacher=teacher, fault_at_step=7)
    assert store.read_manifest(student.key)["sha256"] == student.sha256  # the old checkpoint is still there
    info = jobs.run_round(cfg, store, round_index=1, teacher=teacher)  # a plain rerun continues the retraining
    assert info.trained and info.resumed_from == 5
    assert store.read_manifest(student.key)["parent_sha256"] == new_teacher_sha


def test_a_corrupt_round_is_retrained_saying_so(template: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    manifest = store.read_manifest(student.key)
    weights = Path(store._path(student.key)) / manifest["files"]["weights"]["path"]  # noqa: SLF001
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="pd_core")
    info = jobs.run_round(cfg, store, round_index=1, teacher=jobs.ensure_teacher(cfg, store))
    assert info.trained and info.sha256 == student.sha256  # the same weights again (CPU, deterministic)
    lines = log_lines(caplog.records, "is corrupt")
    assert len(lines) == 1 and re.search(r"^round 1 \(8->4\): the checkpoint at \S+ is corrupt \(.*sha256.*\); "
                                         r"retraining it$", lines[0]), lines
    assert store.is_complete(student.key)


def test_manifests_and_states_record_their_lineage(template: Path, tmp_path: Path) -> None:
    from pd_core import lineage

    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    teacher = store.read_manifest(jobs.teacher_key("faults"))
    want = lineage.teacher_lineage(cfg)
    assert (teacher["settings_hash"], teacher["parent_sha256"]) == (want.settings_hash, None)
    assert json.loads(json.dumps(teacher["settings"])) == want.settings
    round1 = store.read_manifest(student.key)
    assert round1["parent_sha256"] == teacher["sha256"]
    assert round1["settings_hash"] == lineage.round_lineage(cfg, round_index=1, teacher_steps=8,
                                                            parent_sha256=teacher["sha256"]).settings_hash
    assert round1["settings"]["distill"] == {"batch_size": 64, "lr": 0.0005, "grad_clip": None, "dropout": 0.0,
                                             "updates": 20, "student_parameterization": "x"}


def test_the_data_parallel_layout_decides_the_weights_and_one_process_keeps_its_old_hash() -> None:
    from pd_core import lineage

    def hashes(*overrides: str) -> tuple[str, str]:
        cfg = _cfg("faults", *overrides)
        return (lineage.teacher_lineage(cfg).settings_hash,
                lineage.round_lineage(cfg, round_index=1, teacher_steps=8, parent_sha256="ab" * 32).settings_hash)

    one = hashes()
    one_settings = lineage.teacher_lineage(_cfg("faults")).settings
    assert "processes" not in one_settings  # single-process checkpoints made before the field keep their hash
    assert lineage.settings_hash(one_settings) == one[0]
    layouts = {"nproc=2": hashes("runtime.nproc=2"), "nodes=2": hashes("runtime.nodes=2"),
               "nproc=2,nodes=2": hashes("runtime.nproc=2", "runtime.nodes=2")}
    for name, pair in layouts.items():
        assert pair[0] != one[0] and pair[1] != one[1], name
    assert len({pair for pair in layouts.values()}) == len(layouts)
    two = lineage.teacher_lineage(_cfg("faults", "runtime.nproc=2")).settings
    assert lineage.settings_difference(one_settings, two) == "runtime.nproc <unset> -> 2, runtime.nodes <unset> -> 1"
