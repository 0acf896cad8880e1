"""The team-server stack end to end, without Docker: real servers on loopback, the real deployments.

scripts/fullstack/ starts PostgreSQL (a throwaway cluster), a moto S3 server, `prefect
server` and `mlflow server` on Postgres (MLflow artifacts proxied to s3://mlflow/), runs
`python -m deployments.deploy` against the server and starts a process worker configured by
environment only (PD_STORAGE=s3://checkpoints/..., MLFLOW_TRACKING_URI, the S3 endpoint), like the
compose `worker` service. Then, as a user would from the UI:

1. run the `pd-teacher` deployment (preset smoke, a unique pipeline name);
2. its `pd.teacher.completed` event must make the `pd-distill` trigger start the distillation
   pipeline for that name and teacher, which runs every round through the worker;
3. every round's `pd.round.completed` event must start a `pd-notify` run;

and checks the results where the team would look: Prefect (flow/task runs and their states), the
S3 bucket (complete, verified checkpoints), the MLflow server (parent run + child runs, artifacts
in the `mlflow` bucket).

Progress lines go to stdout (`pytest -s` shows them live). The pipeline is the smoke preset with
one override, runtime.threads=1 (see RUNTIME_OVERRIDES); about 3-4 minutes in all on 2 busy CPU
cores. PD_FULLSTACK_FAST=1 also shortens training and evaluation (FAST_OVERRIDES) for slower
machines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# scripts/ is not a package on sys.path: load scripts/fullstack/ by its location.
_spec = importlib.util.spec_from_file_location("fullstack", ROOT / "scripts" / "fullstack" / "__init__.py")
fs = importlib.util.module_from_spec(_spec)
sys.modules["fullstack"] = fs  # its relative imports and dataclasses look the package up there
_spec.loader.exec_module(fs)

pytestmark = [pytest.mark.fullstack, pytest.mark.slow]

POOL = "fullstack-pool"
# One torch thread: on a busy 2-core machine two threads are 10-50x slower for this tiny net
# (OpenMP threads spin against the servers and each other); on an idle one it costs nothing.
RUNTIME_OVERRIDES = ["runtime.threads=1"]
# PD_FULLSTACK_FAST=1: shorter training and evaluation than the preset, same code paths (in-run
# checkpoints, three rounds 8->4->2->1, evaluation, report).
FAST_OVERRIDES = [
    "teacher.updates=40", "teacher.log_every=10", "teacher.checkpoint_every=20",
    "distill.updates_per_round=10", "distill.log_every=5", "distill.checkpoint_every=5",
    "eval.num_samples=100", "eval.batch_size=100", "eval.kid_subset_size=50", "eval.classifier_epochs=1",
    "eval.stochastic_gammas=[]",  # teacher baselines: DDIM only (the stochastic sampler has its own tests)
]
ROUNDS = [(1, 8, 4), (2, 4, 2), (3, 2, 1)]  # smoke: start_steps 8, final_steps 1
# Every wait after the stack is up, together: a bound on a hang, not a speed target. 344 s for the whole test was
# measured on 2 cores at load 12; an idle machine needs a fraction of it. pytest-timeout below is the backstop.
TOTAL_BUDGET_S = 900
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
REQUIRE_TRAINING_LINES = True  # pd_core lines reach Prefect run logs (tasks.env.attach_pd_core_logs)


def _skip_reason() -> str | None:
    if fs.find_pg_bin() is None:
        return "PostgreSQL server binaries not found (install postgresql, or set PD_PG_BIN)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without `runuser` (PostgreSQL refuses to run as root)"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run PostgreSQL as"
    for module in ("moto.server", "psycopg2", "asyncpg", "boto3"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    return None


class Deadline:
    """The remaining part of one overall time budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        return max(1.0, min(cap, self.end - time.monotonic()))


class Prefect:
    """Just what the test needs from the Prefect API, through Prefect's own client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def deployment_id(self, name: str) -> Any:
        return self.client.read_deployment_by_name(name).id

    def flow_runs_of(self, deployment_id: Any) -> list[Any]:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        return self.client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=50)

    def task_runs_of(self, flow_run_id: Any) -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        return self.client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                          limit=200)

    def artifacts_of(self, flow_run_id: Any) -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        return self.client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    def messages_of(self, flow_run_id: Any) -> list[str]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        out: list[str] = []
        while True:  # the API returns at most 200 per call
            page = self.client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                         limit=200, offset=len(out))
            out += [entry.message for entry in page]
            if len(page) < 200:
                return out

    def logs_of(self, flow_run_id: Any, limit: int = 60) -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        logs = self.client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                     sort=LogSort.TIMESTAMP_DESC, limit=limit)
        return "\n".join(f"  {entry.timestamp:%H:%M:%S} {entry.message}" for entry in reversed(logs))

    def wait_for(self, flow_run_id: Any, *, what: str, timeout_s: float, stack: Any) -> Any:
        """Poll a flow run until it is terminal, printing its state and finished task runs as they change."""
        start, seen, last_state = time.monotonic(), set(), None
        while True:
            run = self.client.read_flow_run(flow_run_id)
            state = run.state.type.value if run.state else "NONE"
            if state != last_state:
                fs.log(f"{what}: {run.state.name if run.state else state}")
                last_state = state
            for task_run in self.task_runs_of(flow_run_id):
                if task_run.state and task_run.state.is_final() and task_run.name not in seen:
                    seen.add(task_run.name)
                    fs.log(f"{what}:   task run {task_run.name}: {task_run.state.name}")
            if state in TERMINAL:
                return run
            for service in stack.services.values():
                service.check_running()
            if time.monotonic() - start > timeout_s:
                worker_log = fs.tail(stack.services["worker"].log_path)
                raise AssertionError(f"{what} not finished after {timeout_s:.0f} s (state {state})\n"
                                     f"{self.logs_of(flow_run_id)}\n--- worker:\n{worker_log}")
            time.sleep(2)


def _fail_with_logs(prefect: Prefect, run: Any, what: str, stack: Any) -> None:
    if run.state is None or not run.state.is_completed():
        pytest.fail(f"{what} ended {run.state.name if run.state else None}: {run.state.message if run.state else ''}\n"
                    f"{prefect.logs_of(run.id)}\n--- worker:\n{fs.tail(stack.services['worker'].log_path)}")


@pytest.mark.timeout(1080, method="signal")  # backstop: a signal, so the stack's cleanup still runs
def test_teacher_run_triggers_distillation_on_the_full_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    uid = uuid.uuid4().hex[:8]
    name = f"fullstack-{uid}"
    storage = f"s3://checkpoints/fullstack-{uid}"
    # The teacher's overrides travel to the distillation run through the pd.teacher.completed event.
    overrides = RUNTIME_OVERRIDES + (FAST_OVERRIDES if os.environ.get("PD_FULLSTACK_FAST") == "1" else [])
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    with fs.FullStack(tmp_path / "stack", server_timeout_s=300) as stack:
        info = stack.info
        stack.deploy(pool=POOL, extra_args=("--notify-flow",))  # the pd-notify flow: a run per round
        stack.start_worker(pool=POOL, storage=storage)
        timings["stack up (servers, deploy, worker)"] = round(time.monotonic() - t_start, 1)
        deadline = Deadline(TOTAL_BUDGET_S)

        with temporary_settings(updates={PREFECT_API_URL: info.prefect_api_url,
                                         PREFECT_API_AUTH_STRING: info.prefect_auth_string}), \
                get_client(sync_client=True) as client:
            prefect = Prefect(client)
            distill_id = prefect.deployment_id("progressive-distillation/pd-distill")
            notify_id = prefect.deployment_id("pd-round-notify/pd-notify")

            # 1. The teacher, as "Run" in the UI would start it.
            t0 = time.monotonic()
            teacher_run = run_deployment("train-teacher/pd-teacher", timeout=0, flow_run_name=f"teacher-{name}",
                                         parameters={"preset": "smoke", "name": name, "overrides": overrides})
            fs.log(f"pd-teacher: flow run {teacher_run.id} created (pipeline {name}, storage {storage})")
            teacher_run = prefect.wait_for(teacher_run.id, what="pd-teacher", timeout_s=deadline.left(600), stack=stack)
            _fail_with_logs(prefect, teacher_run, "pd-teacher", stack)
            timings["teacher flow run"] = round(time.monotonic() - t0, 1)

            # 2. The trigger starts pd-distill for the same pipeline name.
            t0 = time.monotonic()
            wait_s = deadline.left(300)
            distill_run = None
            while distill_run is None:
                distill_run = next((r for r in prefect.flow_runs_of(distill_id) if r.parameters.get("name") == name),
                                   None)
                if distill_run is None:
                    if time.monotonic() - t0 > wait_s:
                        pytest.fail(f"no pd-distill run for {name} within {wait_s:.0f} s of the teacher's completion:"
                                    f" the pd.teacher.completed trigger did not fire\n--- prefect server:\n"
                                    f"{fs.tail(stack.services['prefect-server'].log_path)}")
                    time.sleep(1)
            timings["distill run created (s after teacher run end)"] = round(
                (distill_run.created - teacher_run.end_time).total_seconds(), 1)
            fs.log(f"pd-distill: flow run {distill_run.id} created by the trigger (automation "
                   f"{distill_run.created_by.display_value if distill_run.created_by else '?'})")
            t0 = time.monotonic()
            distill_run = prefect.wait_for(distill_run.id, what="pd-distill", timeout_s=deadline.left(900), stack=stack)
            _fail_with_logs(prefect, distill_run, "pd-distill", stack)
            timings["distill flow run"] = round(time.monotonic() - t0, 1)

            # The trigger passed the teacher's event payload through, typed.
            params = distill_run.parameters
            teacher_uri = f"{storage}/pipelines/{name}/teacher"
            assert params["teacher_uri"] == teacher_uri
            assert params["preset"] == "smoke"
            assert params["overrides"] == overrides
            assert params["storage"] == storage  # the worker's PD_STORAGE, resolved by the teacher run
            assert params["tracking_uri"] == info.mlflow_url
            assert distill_run.created_by is not None and distill_run.created_by.type == "AUTOMATION", \
                distill_run.created_by

            # Named after the pipeline (a name given when the run was created is replaced), tagged with it.
            assert teacher_run.name.startswith(f"{name}-teacher-"), teacher_run.name
            assert distill_run.name.startswith(f"{name}-") and "teacher" not in distill_run.name, distill_run.name
            assert f"pipeline:{name}" in distill_run.tags and "preset:smoke" in distill_run.tags, distill_run.tags
            # Both runs went through the worker of the pool.
            for run in (teacher_run, distill_run):
                assert run.work_pool_name == POOL
                assert run.infrastructure_pid, f"{run.name}: no infrastructure pid: not started by the worker"

            # One task run per round, all completed (and the teacher task: found complete, skipped).
            task_runs = {t.name: t for t in prefect.task_runs_of(distill_run.id)}
            for index, t_steps, s_steps in ROUNDS:
                round_name = f"round-{index:02d}-{t_steps}to{s_steps}"
                for task_name in (round_name, f"eval-{round_name}"):
                    assert task_name in task_runs, sorted(task_runs)
                    assert task_runs[task_name].state.is_completed(), (task_name, task_runs[task_name].state)
            assert task_runs["teacher"].state.is_completed()
            assert "report" in task_runs, sorted(task_runs)
            assert all(t.state.is_completed() for t in task_runs.values()), \
                {n: t.state.name for n, t in task_runs.items()}
            for tr in prefect.task_runs_of(teacher_run.id):
                assert tr.state.is_completed(), (tr.name, tr.state)
            # What the UI shows besides the task runs: training progress and the quality-vs-steps table,
            # and pd_core's own log lines (training steps) in the flow-run logs.
            artifact_types = {a.type for a in prefect.artifacts_of(distill_run.id)}
            assert {"table", "progress"} <= artifact_types, artifact_types
            _check_training_lines(prefect, teacher_run.id, distill_run.id)

            # 3. pd-notify: one run per pd.round.completed event.
            t0 = time.monotonic()
            wait_s = deadline.left(300)
            while True:
                notify_runs = [r for r in prefect.flow_runs_of(notify_id) if r.parameters.get("pipeline") == name]
                done = [r for r in notify_runs if r.state and r.state.type.value in TERMINAL]
                if len(done) >= len(ROUNDS):
                    break
                if time.monotonic() - t0 > wait_s:
                    pytest.fail(f"pd-notify: {len(notify_runs)} runs ({len(done)} finished) for {name} after "
                                f"{wait_s:.0f} s, expected {len(ROUNDS)}")
                time.sleep(2)
            timings["notify runs finished after distill"] = round(time.monotonic() - t0, 1)
            for run in notify_runs:
                _fail_with_logs(prefect, run, f"pd-notify {run.name}", stack)
                assert run.work_pool_name == POOL
            assert sorted(r.parameters["payload"]["round"] for r in notify_runs) == [i for i, _, _ in ROUNDS]
            assert sorted(r.name for r in notify_runs) == [f"{name}-round-{i:02d}-{t}to{s}" for i, t, s in ROUNDS]
            assert all(r.parameters["payload"]["checkpoint_uri"].startswith(f"{storage}/pipelines/{name}/rounds/")
                       for r in notify_runs)
            assert any(a.type == "markdown" for r in notify_runs for a in prefect.artifacts_of(r.id))
            fs.log(f"pd-notify: {len(notify_runs)} runs completed, rounds "
                   f"{sorted(r.parameters['payload']['round'] for r in notify_runs)}")

        # 4. Checkpoints in S3: complete manifests, files that verify.
        _check_checkpoints(info, monkeypatch, name=name, storage=storage)
        # 5. MLflow: parent + child runs on the server, artifacts in the `mlflow` bucket.
        _check_mlflow(info, name=name)
        # Nothing was left in the tracker's offline journals ($PD_HOME/mlflow-journals for an S3 store): every
        # call reached the server.
        for journal in (info.worker_pd_home / "mlflow-journals").glob("*.jsonl"):
            assert not journal.read_text().strip(), journal.read_text()[:2000]

    timings["total"] = round(time.monotonic() - t_start, 1)
    fs.log("timings: " + json.dumps({**stack.timings, **timings}))


def _check_training_lines(prefect: Prefect, teacher_run_id: Any, distill_run_id: Any) -> None:
    """pd_core's training lines ("teacher step 25/150 ...") should be in the flow-run logs (the UI).

    Today they are not in worker-run flows: Prefect configures logging before the flow module is
    imported, so tasks/env.py's PREFECT_LOGGING_EXTRA_LOGGERS default comes too late and the
    `pd_core` logger stays at the root's WARNING level. Until tasks/ attaches the logger at flow
    start, this only warns; make it an assert (REQUIRE_TRAINING_LINES) once that is fixed.
    """
    wanted = {"teacher": (teacher_run_id, "teacher step")}
    wanted.update({f"round {i}": (distill_run_id, f"round {i} ({t}->{s}) step") for i, t, s in ROUNDS})
    messages = {run_id: prefect.messages_of(run_id) for run_id in {teacher_run_id, distill_run_id}}
    missing = [what for what, (run_id, text) in wanted.items() if not any(text in m for m in messages[run_id])]
    if REQUIRE_TRAINING_LINES:
        assert not missing, f"pd_core training lines missing from the flow-run logs: {missing}"
    elif missing:
        warnings.warn(f"pd_core training lines missing from the flow-run logs ({', '.join(missing)}): "
                      "the `pd_core` logger is not attached to Prefect in worker-run flows", stacklevel=1)
    else:
        fs.log("flow-run logs: pd_core training lines present")


def _s3_client(info: Any) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=info.s3_url, region_name="us-east-1",
                        aws_access_key_id=fs.S3_ACCESS_KEY, aws_secret_access_key=fs.S3_SECRET_KEY)


def _keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def _check_checkpoints(info: Any, monkeypatch: pytest.MonkeyPatch, *, name: str, storage: str) -> None:
    from pd_core.jobs import round_key, teacher_key
    from pd_core.store import CheckpointStore

    s3 = _s3_client(info)
    prefix = storage.removeprefix("s3://checkpoints/")
    keys = _keys(s3, "checkpoints", f"{prefix}/pipelines/{name}/")
    fs.log(f"s3://checkpoints: {len(keys)} objects under {prefix}/pipelines/{name}/")
    expected = [(teacher_key(name), 8)] + [(round_key(name, round_index=i, student_steps=s), s) for i, _, s in ROUNDS]
    for key, _ in expected:
        assert f"{prefix}/{key}/manifest.json" in keys, (key, sorted(keys))

    for var, value in info.s3_env().items():
        monkeypatch.setenv(var, value)
    store = CheckpointStore(storage, storage_options={"endpoint_url": info.s3_url})
    parent_sha = None
    for key, steps in expected:
        manifest = store.read_manifest(key)
        assert manifest is not None and manifest["status"] == "complete", (key, manifest)
        assert manifest.get("steps") == steps, (key, manifest)
        assert store.is_complete(key), f"{key}: files do not verify"
        if parent_sha is not None and "parent_sha256" in manifest:
            assert manifest["parent_sha256"] == parent_sha, key  # each round distils the previous student
        parent_sha = manifest["sha256"]
        # The resumable in-round state was cleared once the round was published.
        assert not any(k.startswith(f"{prefix}/{key}.state/") and k.endswith(".safetensors") for k in keys), key


def _check_mlflow(info: Any, *, name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=info.mlflow_url, registry_uri=info.mlflow_url)
    experiment = client.get_experiment_by_name("progressive-distillation")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location  # proxied
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`pd.pipeline` = '{name}'",
                              max_results=100)
    by_name = {r.info.run_name: r for r in runs}
    fs.log(f"mlflow: {len(runs)} runs for {name}: {sorted(by_name)}")
    parents = [r for r in runs if r.data.tags.get("pd.kind") == "pipeline"]
    assert len(parents) == 1, sorted(by_name)
    parent = parents[0]
    assert parent.info.run_name == name and parent.info.status == "FINISHED", parent.info
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    for index, t_steps, s_steps in ROUNDS:
        run_name = f"{name}/round-{index:02d}-{t_steps}to{s_steps}"
        assert run_name in children, (run_name, sorted(children))
        child = children[run_name]
        assert child.info.status == "FINISHED", child.info
        assert child.data.tags.get("checkpoint_uri", "").endswith(f"/rounds/{index:02d}-{s_steps:04d}"), child.data.tags
        assert child.data.metrics, f"{run_name}: no metrics"
        assert client.list_artifacts(child.info.run_id), f"{run_name}: no artifacts"
    # One parent for the whole pipeline: the teacher flow made it, the triggered distillation continued it.
    assert "prefect.teacher_flow_run_id" in parent.data.tags, parent.data.tags
    teacher = children.get(f"{name}/teacher")
    assert teacher is not None and teacher.data.tags["skipped"] == "false", sorted(children)
    # The report registered the few-step students; alias `final` is the last round's.
    final = client.get_model_version_by_alias(f"pd-{name}", "final")
    assert final.run_id == children[f"{name}/round-03-2to1"].info.run_id, final

    # Artifacts went through the server's proxy into the `mlflow` bucket.
    mlflow_keys = _keys(_s3_client(info), "mlflow")
    for run_name in (f"{name}/round-{i:02d}-{t}to{s}" for i, t, s in ROUNDS):
        run_id = children[run_name].info.run_id
        assert any(f"/{run_id}/artifacts/" in k for k in mlflow_keys), (run_name, mlflow_keys[:20])
    fs.log(f"s3://mlflow: {len(mlflow_keys)} artifact objects")
