"""``pd run`` with explicit ``--storage`` and ``--tracking-uri`` writes nothing into the working folder, and an
outage journal of one tracking URI is never replayed into another (two ``pd run`` subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.helpers import _free_port
from tests.faults.pd_runs import PIPELINE_FAST, _pd_env, _set_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FAST = [*PIPELINE_FAST, "eval.enabled=false"]


def _run(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--name", "outside",
                           *args, *_set_args(FAST)], cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_explicit_storage_and_tracking_keep_the_working_folder_clean_and_journals_apart(tmp_path: Path) -> None:
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    env = _pd_env(tmp_path / "unused")
    for name in ("PD_HOME", "PREFECT_HOME"):  # no project home given: the per-user state folder is used
        env.pop(name)
    env.update({"XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path / "user"),
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})

    down = _run(work, env, "--storage", str(store), "--tracking-uri", f"http://127.0.0.1:{_free_port()}")
    assert down.returncode == 0, down.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == [], "pd run wrote into the working folder"
    assert (tmp_path / "state" / "pd" / "prefect").is_dir() and not (tmp_path / "unused").exists()
    journals = list((store / ".mlflow-journals").glob("mlflow-journal-*.jsonl"))
    assert len(journals) == 1, journals
    pending = journals[0].read_bytes()
    assert {"start_run", "set_tags", "end_run"} <= {json.loads(line)["op"] for line in pending.splitlines()}

    db = tmp_path / "other" / "mlflow.db"
    other = _run(work, env, "--storage", str(store), "--tracking-uri", f"sqlite:///{db}")
    assert other.returncode == 0, other.stderr[-3000:]
    assert "replayed" not in other.stderr, "a journal of another tracking URI was replayed"
    assert journals[0].read_bytes() == pending, "the other backend's journal must wait for its own server"
    assert sorted(p.name for p in work.iterdir()) == []

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("progressive-distillation")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`pd.kind` = 'pipeline'")
    assert len(parents) == 1, [r.info.run_id for r in parents]  # this run's, none replayed from the other URI
