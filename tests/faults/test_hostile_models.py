"""``models:/`` and ``runs:/`` loading: an MLmodel's artifact paths stay inside the downloaded model, and no load
leaves a temp folder (with a copy of the weights) behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from tasks.tracking import Tracker, TrackingError, load_sampler_from_mlflow
from tests.faults.helpers import _cfg, _copy_of, run_cli


@pytest.fixture
def logged(template: Path, tmp_path: Path) -> tuple[str, str, Path]:
    """(tracking URI, runs:/ URI, the logged model's MLmodel file) of the template's round-1 student."""
    store, student = _copy_of(template, tmp_path, _cfg("faults"))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    tracker = Tracker(tracking_uri=tracking_uri, experiment="pd-hostile-models")
    run_id = tracker.start_run(run_name="round-01")
    tensors, manifest = store.load_checkpoint(student.key)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    tracker.log_sampler_model(run_id, weights_path=str(tmp_path / "model.safetensors"), manifest=manifest,
                              registered_model=None)
    mlmodel = next((tmp_path / "mlflow").rglob("MLmodel"))
    return tracking_uri, f"runs:/{run_id}/sampler", mlmodel


def _point(mlmodel: Path, artifact: str, path: str) -> None:
    doc = yaml.safe_load(mlmodel.read_text())
    doc["flavors"]["python_function"]["artifacts"][artifact]["path"] = path
    mlmodel.write_text(yaml.safe_dump(doc))


@pytest.mark.parametrize("artifact, path, message", [
    ("manifest", "/etc/passwd", "the MLmodel's manifest path '/etc/passwd' is not a relative path inside the model"),
    ("manifest", "../../../../../../../../etc/passwd", "is not a file inside the model; refusing it"),
    ("weights", "/etc/passwd", "the MLmodel's weights path '/etc/passwd' is not a relative path inside the model"),
])
def test_an_mlmodel_pointing_outside_the_downloaded_model_is_refused(logged, artifact, path, message):
    tracking_uri, model_uri, mlmodel = logged
    _point(mlmodel, artifact, path)
    with pytest.raises(TrackingError) as err:
        load_sampler_from_mlflow(model_uri, tracking_uri=tracking_uri)
    assert message in str(err.value) and model_uri in str(err.value) and "\n" not in str(err.value)


def test_loading_a_logged_model_leaves_no_temp_folder(cli_home: Path, logged, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tracking_uri, model_uri, mlmodel = logged
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    rc, out, err = run_cli(["sample", "--model", model_uri, "--tracking-uri", tracking_uri, "--num", "2",
                            "--out", str(tmp_path / "grid.png")])
    assert rc == 0 and (tmp_path / "grid.png").exists(), err
    rc, _, err = run_cli(["sample", "--model", "runs:/0123456789abcdef/sampler", "--tracking-uri", tracking_uri,
                          "--out", str(tmp_path / "g2.png")])
    assert rc != 0
    _point(mlmodel, "manifest", "/etc/passwd")
    with pytest.raises(TrackingError):
        load_sampler_from_mlflow(model_uri, tracking_uri=tracking_uri)  # no dst_dir: its own temp folder
    assert sorted(p.name for p in temp.iterdir()) == []
