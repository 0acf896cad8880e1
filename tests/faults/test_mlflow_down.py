"""MLflow unreachable while a round trains (jobs level): training goes on, every call is journaled.

The whole-pipeline version is in test_pipeline_mlflow_down.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from pd_core import jobs
from pd_core.config import flatten
from tests.faults.helpers import _cfg, _copy_of, _free_port


def test_mlflow_down_training_continues_and_calls_are_journaled(template: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from tasks.tracking import Tracker

    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}.items():  # the Tracker's defaults, restored after
        monkeypatch.setenv(name, value)
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    tracker = Tracker(tracking_uri=f"http://127.0.0.1:{_free_port()}", experiment="pd-faults",
                      journal_path=str(tmp_path / "journal.jsonl"))
    caplog.set_level(logging.WARNING, logger="tasks.tracking")
    spent = [0.0]  # seconds inside tracker calls: what the outage costs the training loop

    def timed(call: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            spent[0] += time.monotonic() - t0

    run_id = timed(tracker.start_run, run_name="round-02", params=flatten(cfg))
    assert run_id and run_id.startswith("pending-")
    info = jobs.run_round(cfg, store, round_index=2, teacher=student,
                          on_progress=lambda e: timed(tracker.log_metrics, run_id, {"train_loss": e.loss}, step=e.step))
    timed(tracker.set_tags, run_id, {"checkpoint_uri": info.uri, "checkpoint_sha256": info.sha256})
    timed(tracker.end_run, run_id)

    assert info.trained and store.is_complete(info.key), "training must go on and the checkpoint land"
    assert tracker.flush() == tracker.pending == 1 + 2 + 2  # start, 2 metric events, tags, end: nothing lost
    journal = [json.loads(line) for line in Path(tracker.journal_path).read_text().splitlines()]
    assert [e["op"] for e in journal] == ["start_run", "log_metrics", "log_metrics", "set_tags", "end_run"]
    assert journal[3]["payload"]["tags"]["checkpoint_uri"] == info.uri
    outage = [r.getMessage() for r in caplog.records if r.name == "tasks.tracking"]
    assert len(outage) == 1 and "unreachable" in outage[0] and tracker.journal_path in outage[0], outage
    assert "pending" in tracker.run_link(run_id)
    assert spent[0] < 20, f"the outage cost the training loop {spent[0]:.1f}s"
