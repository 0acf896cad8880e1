"""One MLflow outage journal per tracking URI, kept with the run's state: never replayed into another backend,
never in the working folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_core.config import Config
from tests.faults.helpers import _cfg, _free_port


@pytest.fixture
def fast_mlflow_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}.items():
        monkeypatch.setenv(name, value)


def _tracking(cfg: Config, root: Path, uri: str) -> Config:
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(root)}),
                                  "tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})})


def test_a_journal_never_replays_into_another_tracking_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               fast_mlflow_outage: None) -> None:
    from mlflow import MlflowClient

    from tasks.common import tracker_for

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the same working folder for both runs, as in the issue
    store_root = tmp_path / "store"
    down = _tracking(_cfg("journal"), store_root, f"http://127.0.0.1:{_free_port()}")
    other_db = tmp_path / "other" / "mlflow.db"
    other = _tracking(_cfg("journal"), store_root, f"sqlite:///{other_db}")

    first = tracker_for(down)
    run = first.start_run(run_name="journal", params={"a": 1}, tags={"pd.pipeline": "journal"})
    first.log_metrics(run, {"loss": 1.0}, step=1)
    first.end_run(run)
    assert run.startswith("pending-") and first.pending == 3
    journal = Path(first.journal_path)
    assert journal.parent == store_root / ".mlflow-journals", journal  # with the run's state, not in ./.pd
    assert not any(work.iterdir()), "nothing goes into the working folder"
    saved = journal.read_bytes()

    second = tracker_for(other)
    assert Path(second.journal_path) != journal and second.pending == 0
    own = second.start_run(run_name="other", tags={"pd.pipeline": "journal"})
    second.end_run(own)
    assert second.flush() == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{other_db}")
    experiment = client.get_experiment_by_name(other.tracking.experiment)
    names = [r.info.run_name for r in client.search_runs([experiment.experiment_id])]
    assert names == ["other"], f"calls journaled for another backend replayed here: {names}"
    assert journal.read_bytes() == saved and first.pending == 3  # still waiting for its own server


def test_journal_files_are_named_by_the_uri_without_its_credentials_and_live_with_the_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.common import journal_folder
    from tasks.tracking.journal import journal_name

    a, b = journal_name("http://mlflow:5000"), journal_name("http://mlflow:5001")
    assert a != b and a.startswith("mlflow-journal-") and a.endswith(".jsonl")
    assert journal_name("http://u:pw@mlflow:5000/?token=t1") == journal_name("http://v:other@mlflow:5000/?token=t2")
    assert "pw" not in journal_name("http://u:pw@mlflow:5000")
    assert journal_name("sqlite:///x/../x/mlflow.db") != journal_name("sqlite:///y/mlflow.db")

    cfg = _cfg("journal")
    local = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": f"file://{tmp_path}/s"})})
    assert journal_folder(local) == tmp_path / "s" / ".mlflow-journals"
    s3 = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": "s3://bucket/prefix"})})
    monkeypatch.setenv("PD_HOME", str(tmp_path / "home"))
    assert journal_folder(s3) == tmp_path / "home" / "mlflow-journals"
    monkeypatch.delenv("PD_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert journal_folder(s3) == tmp_path / "xdg" / "pd" / "mlflow-journals"
