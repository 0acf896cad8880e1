"""The MLflow outage journal replays only what this project journaled: a planted line is refused, never replayed.

A line appended to the journal by anyone who can write in the store (``{"op": "log_artifact", "payload":
{"local_path": "/any/file", ...}}``) would otherwise upload that file into another pipeline's run. Lines are
signed with a secret kept outside the store (tasks.tracking.journal); a genuine outage still replays everything.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from tasks.tracking import Tracker
from tasks.tracking.journal import Journal, journal_secret
from tests.test_tracking import _client, _Flaky, clean_env, db_uri, migrated_db  # noqa: F401 - fixtures

SECRET_VALUE = "pd-journal-test-SeCrEt-42"


def _outage(tracker: Tracker, tmp_path: Path) -> tuple[_Flaky, str, str]:
    """A run created while MLflow is up (another pipeline's: the victim), then an outage journaling a run of ours."""
    flaky = _Flaky(_client(tracker.tracking_uri))
    tracker._ops.client = flaky  # noqa: SLF001 - test seam: the client every MLflow call goes through
    victim = tracker.start_run(run_name="other-pipeline", params={"who": "victim"})
    flaky.down = True
    ours = tracker.start_run(run_name="ours", params={"a": 1})
    tracker.log_metrics(ours, {"loss": 0.5}, step=3)
    report = tmp_path / "report.txt"
    report.write_text("round 1 done\n")
    tracker.log_artifact(ours, str(report))
    tracker.end_run(ours)
    assert ours.startswith("pending-") and tracker.pending == 4
    return flaky, victim, ours


def test_a_planted_journal_line_is_refused_with_one_warning_and_the_genuine_outage_replays(
        tmp_path: Path, db_uri: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811 - fixture
    journal_path = tmp_path / "store" / ".mlflow-journals" / "mlflow-journal-test.jsonl"
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-planted", retry_interval_s=3600,
                      journal_path=str(journal_path))
    flaky, victim, ours = _outage(tracker, tmp_path)
    private = tmp_path / "private.txt"
    private.write_text("the contents of /any/file\n")
    lines = journal_path.read_text().splitlines()
    genuine_artifact = json.loads(lines[2])
    tampered = {**genuine_artifact, "payload": {**genuine_artifact["payload"], "local_path": str(private)}}
    planted = [
        {"op": "log_artifact", "payload": {"run_id": victim, "local_path": str(private), "artifact_path": None}},
        tampered,  # a genuine line's mac over another path
        json.loads(lines[1]),  # a genuine line repeated (same id)
        {"op": "set_tags", "payload": {"run_id": victim, "tags": {"planted": "yes"}}, "id": "x", "mac": "0" * 64},
    ]
    with open(journal_path, "a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in planted))

    caplog.set_level(logging.WARNING, logger="tasks.tracking")
    flaky.down = False
    assert tracker.flush() == 0
    assert tracker.flush() == 0  # nothing left, nothing warned twice
    refusals = [r.getMessage() for r in caplog.records if "not written by this project" in r.getMessage()]
    assert refusals == [f"MLflow journal {journal_path}: 4 line(s) not written by this project (no valid "
                        f"signature) refused, never replayed; moved to {journal_path}.refused"]

    client = flaky.real
    assert client.list_artifacts(victim) == [] and "planted" not in client.get_run(victim).data.tags
    real = tracker.resolve_run_id(ours)
    run = client.get_run(real)
    assert run.data.params == {"a": "1"} and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(real, "loss")] == [(3, 0.5)]  # once, not twice
    assert [a.path for a in client.list_artifacts(real)] == ["report.txt"]
    assert not journal_path.exists()
    assert [json.loads(x)["payload"].get("local_path") for x in Path(f"{journal_path}.refused").read_text()
            .splitlines()] == [str(private), str(private), None, None]


def test_the_signing_secret_lives_outside_the_store_and_another_secret_refuses_the_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("PD_JOURNAL_SECRET", raising=False)
    key = journal_secret()
    path = tmp_path / "config" / "pd" / "journal-secret"
    assert path.read_bytes() == key and len(key) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert journal_secret() == key  # created once, then read
    journal = Journal(tmp_path / "store" / "mlflow-journal-x.jsonl")
    journal.path.parent.mkdir(parents=True)
    journal.append({"op": "set_tags", "payload": {"run_id": "r", "tags": {}}})
    assert [e["op"] for e in journal.entries()] == ["set_tags"]
    journal.add_id("pending-1", "run-1")
    assert journal.ids() == {"pending-1": "run-1"}
    monkeypatch.setenv("PD_JOURNAL_SECRET", "another machine's secret")
    assert journal.entries() == [] and journal.ids() == {}  # set the same PD_JOURNAL_SECRET on every machine


def test_a_replayed_text_artifact_is_redacted_as_on_its_first_send(
        tmp_path: Path, db_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 - fixture
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-replay-redact", retry_interval_s=3600,
                      journal_path=str(tmp_path / "journal.jsonl"))
    flaky, _, ours = _outage(tracker, tmp_path)
    stashed = next(Path(f"{tmp_path / 'journal.jsonl'}.files").rglob("report.txt"))
    stashed.write_text(f"token {SECRET_VALUE}\n")  # a secret the replaying process knows of
    monkeypatch.setenv("PD_TEST_API_KEY", SECRET_VALUE)
    flaky.down = False
    assert tracker.flush() == 0
    real = tracker.resolve_run_id(ours)
    folder = flaky.real.download_artifacts(real, "report.txt", str(tmp_path / "down"))
    assert Path(folder).read_text() == "token ***\n"
