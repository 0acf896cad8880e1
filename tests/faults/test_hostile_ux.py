"""Bad input met on the way to the hostile-input defects: one clear line each (exit 2 where it is the user's input)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pd_core import jobs
from pd_core.config import ConfigError, load_config
from pd_core.export.files import ExportError, new_output_path
from pd_core.interop.diffusers_folder import preflight
from pd_core.store import CheckpointStore
from tasks.tracking.uris import new_store_note
from tests.diffusers_models import save_teacher
from tests.faults.helpers import run_cli
from tests.test_diffusers_import import teacher_cfg


def test_an_export_whose_parent_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError) as err:
        new_output_path(str(tmp_path / "afile" / "model.onnx"), what="an ONNX file")
    assert str(err.value) == (f"--out {tmp_path}/afile/model.onnx: {tmp_path}/afile (or a folder above it) is a "
                              f"file, not a folder; choose a path in a folder")


def test_the_hidden_partial_of_a_killed_export_is_removed_by_the_next_export(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no live process now
    stale = tmp_path / f".model.onnx.partial-{dead.pid}"
    stale.write_bytes(b"half an onnx file")
    stale_dir = tmp_path / f".model.onnx.partial-{dead.pid + 1_000_000}"  # beyond pid_max: never alive
    stale_dir.mkdir()
    live = tmp_path / f".model.onnx.partial-{os.getpid()}"  # an export still being written
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.onnx.partial-{dead.pid}"
    other.write_bytes(b"another target's")
    assert new_output_path(str(tmp_path / "model.onnx"), what="an ONNX file") == tmp_path / "model.onnx"
    assert not stale.exists() and not stale_dir.exists() and live.exists() and other.exists()


def test_an_empty_diffusers_teacher_uri_is_named_as_such(cli_home: Path, tmp_path: Path) -> None:
    rc, out, err = run_cli(["run", "--preset", "smoke", "--name", "x", "--teacher-uri", "diffusers:",
                            "--storage", str(tmp_path / "s")])
    assert rc == 2 and out == "" and err == ("error: pipeline.teacher_uri must name a folder after 'diffusers:' "
                                             "(diffusers:<folder or fsspec URL>), got 'diffusers:'\n")


def test_a_new_sqlite_tracking_file_is_announced_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "mlflow.db"
    assert new_store_note(f"sqlite:///{missing}") == (f"note: {missing} does not exist yet: a new, empty MLflow "
                                                      f"database is created there (check --tracking-uri)")
    missing.parent.mkdir()
    missing.write_bytes(b"")
    assert new_store_note(f"sqlite:///{missing}") is None and new_store_note("http://mlflow:5000") is None
    assert new_store_note(None) is None


def test_guided_distillation_of_a_diffusers_teacher_without_a_null_class_is_refused_in_the_preflight(
        tmp_path: Path) -> None:
    folder = save_teacher(tmp_path / "teacher", num_class_embeds=10)
    cfg = load_config(preset="smoke-guided", overrides=[f"pipeline.teacher_uri=diffusers:{folder}",
                                                        f"storage.root={tmp_path / 's'}"])
    with pytest.raises(ConfigError, match=r"^guidance.enabled: an imported diffusers UNet2DModel has no null class"):
        preflight(cfg)
    cfg = load_config(preset="smoke-guided", overrides=[f"pipeline.teacher_uri=diffusers:{folder}",
                                                        "guidance.enabled=false", "eval.guidance_weights=[0,2]",
                                                        f"storage.root={tmp_path / 's'}"])
    with pytest.raises(ConfigError, match=r"^eval.guidance_weights: w = 2 needs a null class"):
        preflight(cfg)


def test_pd_eval_with_more_steps_than_the_teacher_has_timesteps_is_one_line(cli_home: Path, tmp_path: Path) -> None:
    folder = save_teacher(tmp_path / "teacher", num_train_timesteps=1000)
    cfg = teacher_cfg(folder, tmp_path / "store")
    info = jobs.import_diffusers_teacher(cfg, CheckpointStore(cfg.storage.root), uri=cfg.pipeline.teacher_uri)
    rc, out, err = run_cli(["eval", "--model", info.uri, "--steps", "2000", "--preset", "smoke",
                            "--storage", str(tmp_path / "evals")])
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, (rc, err)
    assert "was trained on 1000 timesteps, fewer than the 2000 sampling steps asked for (--steps)" in err
