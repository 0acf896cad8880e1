"""tasks.tracking against real MLflow: a sqlite file in tmp_path, and a real `mlflow server` for outages."""

from __future__ import annotations

import os

# Offline hygiene before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import quote  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tasks.tracking import Tracker, flatten_params, load_sampler_from_mlflow, redact  # noqa: E402

FAKE_KEY_ID = "AKIAFAKEKEYID0123456"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYFAKESECRET"
FAKE_TOKEN = "tok-FAKE-session-token-9876"
CONFIG = {"model": {"ch": 8, "ch_mult": [1, 2]}, "distill": {"start_steps": 8, "lr": 1e-4},
          "storage": {"root": "memory://store", "storage_options": {}}}
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracker sets HTTP retry defaults in os.environ; monkeypatch puts the environment back after each test."""
    for name in (*_HTTP_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PD_MLFLOW_UI_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite DB with its schema migrated once per module (tests get copies)."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def db_uri(tmp_path: Path, migrated_db: Path) -> str:
    target = tmp_path / "mlflow" / "mlflow.db"
    target.parent.mkdir()
    shutil.copyfile(migrated_db, target)
    return f"sqlite:///{target}"


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _tiny_weights(path: Path, *, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen), "conv.bias": torch.zeros(4)}
    save_file(tensors, str(path))
    return tensors


# ----------------------------------------------------------------------------------------------
# Pure helpers


def test_flatten_params_gives_dotted_names() -> None:
    flat = flatten_params({"model": {"ch": 8, "ch_mult": [1, 2], "attn": {}}, "seed": 0})
    assert flat == {"model.ch": 8, "model.ch_mult": [1, 2], "model.attn": {}, "seed": 0}
    assert flatten_params({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": 1}


def test_redact_replaces_secret_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("SOME_SERVICE_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "abc")  # shorter than 4: left alone
    text = (f"s3://{FAKE_KEY_ID}:{quote(FAKE_SECRET, safe='')}@bucket/x key={FAKE_KEY_ID} "
            f"secret={FAKE_SECRET} token={FAKE_TOKEN} abc")
    out = redact(text)
    for secret in (FAKE_SECRET, FAKE_KEY_ID, FAKE_TOKEN, quote(FAKE_SECRET, safe="")):
        assert secret not in out
    assert out.endswith(" abc") and "***" in out
    assert redact("postgresql://user:hunter22@db:5432/x") == "postgresql://user:***@db:5432/x"
    assert redact("nothing secret here") == "nothing secret here"


# ----------------------------------------------------------------------------------------------
# Runs, params, metrics, artifacts (sqlite)


def test_parent_and_child_runs_line_up(tmp_path: Path, db_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the current directory
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-test")
    params = flatten_params(CONFIG)
    parent = tracker.start_run(run_name="pipeline-demo", params=params, tags={"pd.pipeline": "demo"})
    children = []
    for index, (teacher_steps, student_steps) in enumerate([(8, 4), (4, 2)], start=1):
        child = tracker.start_run(run_name=f"round-{index:02d}-{teacher_steps}to{student_steps}", parent_run_id=parent,
                                  params={**params, "round": index, "teacher_steps": teacher_steps,
                                          "student_steps": student_steps},
                                  tags={"pd.pipeline": "demo", "pd.round": str(index)})
        for step in range(3):
            tracker.log_metrics(child, {"train/loss": 1.0 / (step + 1)}, step=step)
        tracker.log_metrics(child, {"eval/fid": 10.0 * index, "sec_per_image": 0.01}, step=student_steps)
        tracker.set_tags(child, {"pd.checkpoint_uri": f"file:///store/rounds/{index:02d}",
                                 "pd.checkpoint_sha256": "ab" * 32})
        children.append(child)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    tracker.log_artifact(children[0], str(grid), artifact_path="samples")
    tracker.log_text(children[0], "# round 1\nall good\n", artifact_file="report.md")
    table = pd.DataFrame({"steps": [4, 2], "fid": [10.0, 20.0], "model": ["student", "student"]})
    tracker.log_table(parent, table, artifact_file="quality.csv")
    tracker.end_run(children[0])
    tracker.end_run(children[1], status="FAILED")
    tracker.end_run(parent)
    assert tracker.pending == 0

    client = _client(tracker.tracking_uri)
    runs = {rid: client.get_run(rid) for rid in (parent, *children)}
    assert runs[parent].data.params["distill.lr"] == "0.0001"
    child_keys = [set(runs[c].data.params) for c in children]
    assert child_keys[0] == child_keys[1] == set(params) | {"round", "teacher_steps", "student_steps"}
    assert all(runs[c].data.tags["mlflow.parentRunId"] == parent for c in children)
    assert runs[children[0]].info.run_name == "round-01-8to4"
    assert [m.step for m in client.get_metric_history(children[0], "train/loss")] == [0, 1, 2]
    assert client.get_metric_history(children[1], "eval/fid")[0].step == 2
    assert runs[children[0]].data.tags["pd.checkpoint_uri"] == "file:///store/rounds/01"
    assert [runs[r].info.status for r in (parent, *children)] == ["FINISHED", "FINISHED", "FAILED"]
    assert {a.path for a in client.list_artifacts(children[0])} == {"samples", "report.md"}
    assert {a.path for a in client.list_artifacts(parent)} == {"quality.csv", "quality.json"}
    # the JSON is what mlflow.log_table writes, and the UI tag lists it as a table
    json_path = client.download_artifacts(parent, "quality.json", str(tmp_path / "dl"))
    pd.testing.assert_frame_equal(pd.read_json(json_path, orient="split"), table, check_dtype=False)
    assert json.loads(runs[parent].data.tags["mlflow.loggedArtifacts"]) == [{"path": "quality.json", "type": "table"}]
    # resuming a round finds its child run by tags
    assert tracker.find_run(tags={"pd.pipeline": "demo", "pd.round": "2"}) == children[1]
    assert tracker.find_run(tags={"pd.round": "9"}) is None
    # artifacts live next to the sqlite file, never in the working directory
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "mlflow" / "mlartifacts" / children[0] / "artifacts" / "report.md").is_file()


def test_params_are_truncated_and_changed_values_do_not_raise(db_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-test")
    run = tracker.start_run(run_name="r", params={"long": "x" * 7000, "lr": 0.1})
    caplog.set_level(logging.WARNING, logger="tasks.tracking")
    tracker.log_params(run, {"lr": 0.2, "new": 1})  # a resumed run re-logging a changed param
    tracker.log_metrics("0" * 32, {"loss": 1.0})  # unknown run: refused, logged, not raised
    params = _client(tracker.tracking_uri).get_run(run).data.params
    assert len(params["long"]) == 6000 and params["long"].endswith("chars]")
    assert params["lr"] == "0.1" and params["new"] == "1"
    assert tracker.pending == 0
    assert any("lr" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)


def test_run_link_gives_the_mlflow_ui_command_and_the_run_page(db_uri: str) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-test")
    run = tracker.start_run(run_name="r")
    link = tracker.run_link(run)
    # This interpreter's MLflow, so the command works without activating the venv.
    assert link.startswith(f"{sys.executable} -m mlflow ui --backend-store-uri {db_uri}  then open ")
    experiment = _client(db_uri).get_experiment_by_name("pd-test").experiment_id
    assert link.endswith(f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}?workflowType=machine_learning")


def test_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    tracker = Tracker(tracking_uri=f"sqlite:///{tmp_path}/off/mlflow.db", experiment="x", enabled=False)
    run = tracker.start_run(run_name="r", params={"a": 1})
    assert run is None
    tracker.log_metrics(run, {"a": 1.0})
    tracker.end_run(run)
    assert tracker.log_sampler_model(run, weights_path="nope", manifest={}, registered_model="m") == ("", None)
    assert tracker.flush() == 0 and tracker.pending == 0
    assert not (tmp_path / "off").exists()


# ----------------------------------------------------------------------------------------------
# Credentials


def test_credentials_never_reach_mlflow(tmp_path: Path, db_uri: str, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    src = tmp_path / "src"
    src.mkdir()
    creds_url = f"s3://{FAKE_KEY_ID}:{quote(FAKE_SECRET, safe='')}@bucket/pd"
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-secrets")
    run = tracker.start_run(run_name=f"run-{FAKE_TOKEN}", params={
        "storage": {"root": creds_url, "storage_options": {"key": FAKE_KEY_ID, "secret": FAKE_SECRET,
                                                           "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}},
        "note": f"token {FAKE_TOKEN}"}, tags={"pd.store": creds_url})
    tracker.log_params(run, {"storage_options": {"token": "not-an-env-value", "anon": False}})
    tracker.set_tags(run, {"pd.checkpoint_uri": f"{creds_url}/rounds/01", "pd.secret": FAKE_SECRET})
    tracker.log_metrics(run, {f"loss_{FAKE_TOKEN}": 1.0}, step=1)
    tracker.log_text(run, f"storage: {creds_url}\nsecret: {FAKE_SECRET}\n", artifact_file="config.yaml")
    tracker.log_table(run, pd.DataFrame({"uri": [creds_url], "fid": [1.0]}), artifact_file="table.csv")
    (src / "resolved.json").write_text(json.dumps({"root": creds_url, "secret": FAKE_SECRET}))
    tracker.log_artifact(run, str(src / "resolved.json"))
    tracker.log_sampler_model(run, weights_path=str(_write(src / "w.safetensors")),
                              manifest={"steps": 1, "store": creds_url}, registered_model="pd-secret-sampler")
    tracker.end_run(run)
    assert tracker.pending == 0

    params = _client(tracker.tracking_uri).get_run(run).data.params
    assert params["storage.storage_options.secret"] == "***" and params["storage_options.token"] == "***"
    assert params["storage.storage_options.client_kwargs.endpoint_url"] == "http://127.0.0.1:9"
    needles = [s.encode() for s in (FAKE_SECRET, FAKE_KEY_ID, FAKE_TOKEN, quote(FAKE_SECRET, safe=""),
                                    "not-an-env-value")]
    stores = [p for p in (tmp_path / "mlflow").rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in stores) and any(p.name == "MLmodel" for p in stores)
    for path in stores:
        data = path.read_bytes()
        assert not [n for n in needles if n in data], f"secret found in {path}"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not [n for n in needles if n.decode() in logged]


def _write(path: Path) -> Path:
    _tiny_weights(path)
    return path


# ----------------------------------------------------------------------------------------------
# Outages: journal and replay


class _Flaky:
    """An MlflowClient whose every call fails like an unreachable server while ``down`` is set."""

    def __init__(self, real: MlflowClient):
        self.real = real
        self.down = False

    def __getattr__(self, name: str):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")
            return attr(*args, **kwargs)

        return call


class _Counted:
    """An MlflowClient that records the name of every call made through it (and makes it)."""

    def __init__(self, real: MlflowClient):
        self.real = real
        self.names: list[str] = []

    def __getattr__(self, name: str):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.names.append(name)
            return attr(*args, **kwargs)

        return call


def test_outage_is_journaled_and_replayed_in_order(tmp_path: Path, db_uri: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-outage", retry_interval_s=3600)
    flaky = _Flaky(_client(tracker.tracking_uri))
    tracker._ops.client = flaky  # noqa: SLF001 - test seam: the client every MLflow call goes through
    parent = tracker.start_run(run_name="pipeline", params={"a": 1})
    tracker.log_metrics(parent, {"loss": 1.0}, step=0)

    caplog.set_level(logging.WARNING, logger="tasks.tracking")
    flaky.down = True
    before = int(time.time() * 1000)
    tracker.log_metrics(parent, {"loss": 0.5}, step=1)
    child = tracker.start_run(run_name="round-01", parent_run_id=parent, params={"a": 1, "round": 1},
                              tags={"pd.round": "1"})
    assert child is not None and child.startswith("pending-")
    grandchild = tracker.start_run(run_name="eval", parent_run_id=child, tags={"pd.round_run": child})
    assert tracker.find_run(tags={"pd.round": "1"}) == child
    assert "pending" in tracker.run_link(child)
    for step in range(3):
        tracker.log_metrics(child, {"loss": float(step)}, step=step)
    tracker.set_tags(child, {"pd.checkpoint_sha256": "ef" * 32})
    tracker.log_text(child, "offline report", artifact_file="report.md")
    weights = tmp_path / "student.safetensors"
    tensors = _tiny_weights(weights)
    assert tracker.log_sampler_model(child, weights_path=str(weights), manifest={"steps": 1},
                                     registered_model="pd-outage", alias=["best", "final"]) == (
        f"runs:/{child}/sampler", None)
    weights.unlink()  # the journal stashed its own copy
    tracker.end_run(child)
    tracker.end_run(parent)
    assert tracker.pending == 11
    assert tracker.flush() == 11  # still down: nothing lost, nothing raised
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_lines) == 1 and tracker.journal_path in outage_lines[0].getMessage()

    flaky.down = False
    assert tracker.flush() == 0
    real_child = tracker.resolve_run_id(child)
    assert real_child and not real_child.startswith("pending-")
    client = flaky.real
    run = client.get_run(real_child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.params["round"] == "1"
    assert run.data.tags["pd.checkpoint_sha256"] == "ef" * 32 and run.info.status == "FINISHED"
    nested = client.get_run(tracker.resolve_run_id(grandchild)).data.tags  # placeholders in tags are mapped too
    assert nested["mlflow.parentRunId"] == real_child and nested["pd.round_run"] == real_child
    history = client.get_metric_history(real_child, "loss")
    assert [m.step for m in history] == [0, 1, 2] and all(m.timestamp <= int(time.time() * 1000) for m in history)
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "loss")] == [(0, 1.0), (1, 0.5)]
    assert client.get_metric_history(parent, "loss")[1].timestamp >= before  # the original call time
    assert {a.path for a in client.list_artifacts(real_child)} == {"report.md"}
    assert client.get_run(parent).info.status == "FINISHED"
    path, _ = load_sampler_from_mlflow("models:/pd-outage@best", tracking_uri=db_uri)
    assert torch.equal(load_file(path)["conv.weight"], tensors["conv.weight"])
    assert str(client.get_model_version_by_alias("pd-outage", "final").version) == "1"  # every alias, on replay
    # callers still holding the placeholder reach the real run
    tracker.log_metrics(child, {"late": 1.0}, step=5)
    assert client.get_metric_history(real_child, "late")[0].step == 5
    assert not Path(tracker.journal_path).exists() and tracker.pending == 0


def test_journal_replays_automatically_and_across_trackers(db_uri: str) -> None:
    first = Tracker(tracking_uri=db_uri, experiment="pd-outage2", retry_interval_s=0)
    flaky = _Flaky(_client(first.tracking_uri))
    first._ops.client = flaky  # noqa: SLF001 - test seam, as above
    flaky.down = True
    run = first.start_run(run_name="offline", params={"x": 1})
    first.log_metrics(run, {"m": 2.0}, step=7)
    assert first.pending == 2
    # another tracker (a later task or process) on the same store replays the journal on its first call
    second = Tracker(tracking_uri=db_uri, experiment="pd-outage2", retry_interval_s=0)
    other = second.start_run(run_name="online")
    assert other and not other.startswith("pending-") and second.pending == 0
    real = second.resolve_run_id(run)
    assert _client(db_uri).get_metric_history(real, "m")[0].value == 2.0
    flaky.down = False
    first.end_run(run)  # the first tracker maps its placeholder through the shared journal
    assert _client(db_uri).get_run(real).info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------
# A real MLflow server that goes away and comes back


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(*, db: Path, port: int, artifacts: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", artifacts.as_uri()]
    with open(log_path, "ab") as log_file:
        # Own session: the server's worker processes are killed with it (os.killpg).
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=db.parent, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 300  # a hang bound: MLflow starts slowly on a loaded machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    _kill(proc)
    raise RuntimeError(f"mlflow server did not start in 300 s: {log_path.read_text()[-2000:]}")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.integration
def test_mlflow_server_down_then_back(tmp_path: Path, migrated_db: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(migrated_db, db)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    kwargs = dict(db=db, port=port, artifacts=tmp_path / "server" / "artifacts", log_path=tmp_path / "server.log")
    server = _start_server(**kwargs)
    try:
        tracker = Tracker(tracking_uri=uri, experiment="pd-server", journal_path=str(tmp_path / "journal.jsonl"),
                          retry_interval_s=3600)
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
        parent = tracker.start_run(run_name="pipeline", params=flatten_params(CONFIG))
        tracker.log_metrics(parent, {"loss": 1.0}, step=0)
        experiment_id = _client(uri).get_experiment_by_name("pd-server").experiment_id
        assert tracker.run_link(parent) == \
            f"{uri}/#/experiments/{experiment_id}/runs/{parent}?workflowType=machine_learning"

        _kill(server)
        counted = _Counted(tracker._ops.client)  # noqa: SLF001 - test seam: the client every MLflow call goes through
        tracker._ops.client = counted  # noqa: SLF001
        caplog.set_level(logging.WARNING, logger="tasks.tracking")
        started = time.monotonic()
        tracker.log_metrics(parent, {"loss": 0.5}, step=1)
        child = tracker.start_run(run_name="round-01", parent_run_id=parent,
                                  params={**flatten_params(CONFIG), "round": 1})
        for step in range(3):
            tracker.log_metrics(child, {"loss": 0.1 * step}, step=step)
        tracker.log_text(child, "written while MLflow was down", artifact_file="report.md")
        weights = tmp_path / "student.safetensors"
        tensors = _tiny_weights(weights)
        tracker.log_sampler_model(child, weights_path=str(weights), manifest={"steps": 1},
                                  registered_model="pd-server-sampler", alias="best")
        tracker.end_run(child)
        offline_s = time.monotonic() - started
        # Counted, not timed: one call found MLflow down (after MLFLOW_HTTP_REQUEST_MAX_RETRIES=1 retry); every
        # later call went to the journal without touching the network, so the outage costs training one call.
        assert counted.names == ["log_batch"], counted.names
        assert offline_s < 120, f"an outage stalled training for {offline_s:.1f} s"  # a hang bound, not a speed check
        assert tracker.pending == 8
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1

        server = _start_server(**kwargs)  # same port, same database
        assert tracker.flush() == 0
        client = _client(uri)
        real_child = tracker.resolve_run_id(child)
        run = client.get_run(real_child)
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
        assert set(run.data.params) == set(client.get_run(parent).data.params) | {"round"}
        assert [m.step for m in client.get_metric_history(real_child, "loss")] == [0, 1, 2]
        assert [m.step for m in client.get_metric_history(parent, "loss")] == [0, 1]
        assert {a.path for a in client.list_artifacts(real_child)} == {"report.md"}
        path, manifest = load_sampler_from_mlflow("models:/pd-server-sampler@best", tracking_uri=uri,
                                                  dst_dir=str(tmp_path / "dl"))
        assert manifest == {"steps": 1} and torch.equal(load_file(path)["conv.weight"], tensors["conv.weight"])
        tracker.end_run(parent)
        assert client.get_run(parent).info.status == "FINISHED"
    finally:
        _kill(server)
