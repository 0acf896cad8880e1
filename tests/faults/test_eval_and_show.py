"""``pd eval`` works in the store of the checkpoint's pipeline (its cached classifier, no writes into the rounds
folder), ``--storage`` overrides it, MLflow URIs work; ``pd show`` lists a corrupt round as corrupt."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from pd_core import evaluation, jobs
from pd_core.store import CheckpointStore
from pd_core.train import NonFiniteLossError
from tests.faults.helpers import _cfg, _copy_of, run_cli

EVAL = ["eval.num_samples=64", "eval.kid_subset_size=32", "eval.kid_subsets=4", "eval.classifier_epochs=1"]


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def pipeline(template: Path, tmp_path: Path) -> tuple[CheckpointStore, jobs.CheckpointInfo]:
    """A copy of the template pipeline whose store already caches the feature classifier and reference features."""
    store, student = _copy_of(template, tmp_path, _cfg("faults"))
    evaluation.feature_context(_cfg("faults", *EVAL), store)
    return store, student


def _eval_args(*extra: str) -> list[str]:
    return [a for o in EVAL for a in ("--set", o)] + list(extra)


def test_pd_eval_uses_the_pipelines_store_and_its_cached_classifier(cli_home: Path, pipeline: tuple,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    store, student = pipeline
    root = Path(store._path(""))  # noqa: SLF001 - the files themselves
    rounds, classifiers = root / "pipelines" / "faults" / "rounds", root / "classifiers"
    before_rounds, before_classifiers = _files(rounds), _files(classifiers)
    caplog.set_level(logging.INFO)
    rc, out, err = run_cli(["eval", "--model", student.uri, *_eval_args()])
    assert rc == 0, err
    record = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert record["model_sha256"] == student.sha256 and float(record["fd_digits"]) > 0
    assert _files(rounds) == before_rounds, "pd eval wrote into the pipeline's rounds folder"
    assert _files(classifiers) == before_classifiers, "the cached classifier was retrained or rewritten"
    assert not [r for r in caplog.records if "feature classifier epoch" in r.getMessage()]
    cached = list((root / "evals" / student.sha256[:16]).glob("ddim-0004-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["fd_digits"] == pytest.approx(
        float(record["fd_digits"]))
    assert not (Path.cwd() / ".pd").exists() or not any((Path.cwd() / ".pd").rglob("*.json"))


def test_pd_eval_storage_overrides_the_pipelines_store(cli_home: Path, pipeline: tuple, tmp_path: Path) -> None:
    store, student = pipeline
    root = Path(store._path(""))  # noqa: SLF001
    before = _files(root)
    other = tmp_path / "other-store"
    rc, _, err = run_cli(["eval", "--model", student.uri, "--storage", str(other), *_eval_args()])
    assert rc == 0, err
    assert _files(root) == before, "with --storage nothing goes to the pipeline's store"
    assert list((other / "evals" / student.sha256[:16]).glob("ddim-0004-*.json"))
    assert (other / "classifiers").is_dir()


def test_pd_eval_takes_an_mlflow_model_uri(cli_home: Path, pipeline: tuple, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tasks.tracking import Tracker

    store, student = pipeline
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(tracking_uri=tracking_uri, experiment="pd-eval-test")
    run_id = tracker.start_run(run_name="round-01")
    tensors, manifest = store.load_checkpoint(student.key)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    tracker.log_sampler_model(run_id, weights_path=str(tmp_path / "model.safetensors"), manifest=manifest,
                              registered_model=None)
    rc, out, err = run_cli(["eval", "--model", f"runs:/{run_id}/sampler", "--tracking-uri", tracking_uri,
                            "--storage", str(Path(store._path(""))), *_eval_args()])  # noqa: SLF001
    assert rc == 0, err
    record = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert record["model_sha256"] == student.sha256 and record["model_uri"] == f"runs:/{run_id}/sampler"


def test_pd_show_lists_a_corrupt_round_as_corrupt_and_hides_its_metrics(cli_home: Path, template: Path,
                                                                        tmp_path: Path) -> None:
    store, student = _copy_of(template, tmp_path, _cfg("faults"))
    with pytest.raises(NonFiniteLossError):  # round 2 stops after its update-5 state: a round in training
        jobs.run_round(_cfg("faults"), store, round_index=2, teacher=student, fault_at_step=7)
    csv = ("steps,n_samples,teacher_ddim_fd_digits,distilled_fd_digits,floor_fd_digits\n"
           "8,64,11.5,,1.9\n4,64,12.25,9.875,1.9\n")
    store.put_bytes("pipelines/faults/report/quality.csv", csv.encode())
    rc, healthy, err = run_cli(["show", "faults", "--storage", str(Path(store._path("")))])  # noqa: SLF001
    assert rc == 0 and "9.875" in healthy and "CORRUPT" not in healthy, err
    assert re.search(r"\n\s+2 steps\s+not complete \(in training, update 5\) \S+/rounds/02-0002\n", healthy), healthy

    weights = Path(store._path(student.key)) / store.read_manifest(student.key)["files"]["weights"]["path"]  # noqa: SLF001
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    rc, out, err = run_cli(["show", "faults", "--storage", str(Path(store._path("")))])  # noqa: SLF001
    assert rc == 0, err
    line = next(line for line in out.splitlines() if "01-0004" in line)
    assert "CORRUPT" in line and "truncated" in line, out
    assert "9.875" not in out and "12.25" in out, out  # its metrics hidden, the teacher's still shown
    assert "distilled metrics hidden for [4] step(s)" in out
