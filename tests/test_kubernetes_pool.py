"""The Kubernetes work pool: deploy.py creates it on a real Prefect server, the prefect-kubernetes worker's own
code renders the Job of a real flow run of pd-distill, and kubernetes-validate checks that Job against the
Kubernetes 1.37 OpenAPI schema (strict: no field the schema does not have). No cluster runs here: nothing
is submitted.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from deployments import deploy
from deployments.kubernetes_pool import CODE_DIR, base_job_template

K8S_VERSION = "1.37.0"
POOL = "pd-k8s-test"


def _validate(manifest: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(manifest, desired_version=K8S_VERSION, strict=True)


def test_the_dry_run_plans_the_deployments_on_the_kubernetes_pool(capsys):
    assert deploy.main(["--pool-type", "kubernetes", "--pool", POOL, "--gpus", "2", "--dry-run"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pool_type"] == "kubernetes" and doc["code_dir"] == CODE_DIR
    distill = next(d for d in doc["deployments"] if d["name"] == "pd-distill")
    assert distill["work_pool"] == POOL and distill["job_variables"]["gpus"] == 2
    assert "CUDA_VISIBLE_DEVICES" not in distill["job_variables"]["env"]  # the device plugin picks the GPUs


def test_prefect_kubernetes_default_template_fails_the_schema_that_ours_passes():
    """Why the template moves parallelism/completions: the strict schema has no such pod-spec fields."""
    import kubernetes_validate
    from prefect_kubernetes.worker import _get_base_job_manifest

    with pytest.raises(kubernetes_validate.ValidationError, match="parallelism|completions"):
        _validate({**_get_base_job_manifest(), "metadata": {"name": "x"}})
    pod = base_job_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert "parallelism" not in pod and "completions" not in pod


async def _render(flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        pool = await client.read_work_pool(POOL)
        config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
            flow_run, client=client, work_pool=pool, worker_name="test-worker")
    return config.job_manifest


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_flow_run_on_the_kubernetes_pool_renders_a_valid_job_with_gpus_secret_and_placement(prefect_api):
    from prefect.client.orchestration import get_client

    assert deploy.main(["--pool-type", "kubernetes", "--pool", POOL, "--gpus", "1", "--image", "registry.test/pd:1",
                        "--namespace", "ml", "--env-secret", "pd-s3-mlflow", "--no-notify"]) == 0
    placement = {"node_selector": {"cloud.test/gpu": "h100"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(POOL)
        deployment = client.read_deployment_by_name("progressive-distillation/pd-distill")
        flow_run = client.create_flow_run_from_deployment(deployment.id, job_variables=placement)
    assert pool.type == "kubernetes"
    manifest = asyncio.run(_render(str(flow_run.id)))
    _validate(manifest)
    assert manifest["metadata"]["namespace"] == "ml"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.test/pd:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"] == [{"secretRef": {"name": "pd-s3-mlflow"}}]
    assert pod["nodeSelector"] == placement["node_selector"] and pod["tolerations"] == placement["tolerations"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert not [k for k in env if k.startswith(("AWS_", "MLFLOW_"))]  # settings come from the Secret only


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_round_task_on_kubernetes_submits_a_jobset_and_logs_its_phase_to_prefect(prefect_api, tmp_path,
                                                                                     monkeypatch):
    """The distill-round task itself, in a flow on the Prefect server, against the loopback API (reached through
    a kubeconfig, as outside a cluster); the controller fails the pods at once (no torchrun: that path runs in
    tests/test_kubernetes_jobs.py), so the task fails with the JobSet's reason and its log shows the phases."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from pd_core.jobs import CheckpointInfo
    from tasks.kubernetes import KubernetesJobError
    from tasks.training import distill_round_task
    from tests.k8s_loopback import LoopbackJobSets
    from tests.multinode_rounds import round_cfg

    cfg = round_cfg(tmp_path / "store", "k8s-task", extra=("runtime.launcher=kubernetes",
                                                           "runtime.kubernetes.poll_s=0.2", "tracking.enabled=false",
                                                           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"))
    teacher = CheckpointInfo(key="k", uri="s3://b/k", sha256="0" * 64, steps=8, round=0, trained=True,
                             train_seconds=0.0, resumed_from=0)

    @flow(name="k8s-round-task-test")
    def one_round() -> dict:
        state = distill_round_task(cfg, teacher=teacher, round_index=1, return_state=True)
        return {"failed": state.is_failed(), "message": state.message}

    with LoopbackJobSets(mode="run", log_dir=tmp_path) as api:
        api.start = lambda body: api.pods.__setitem__(body["metadata"]["name"], [_exited(1)])
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "loopback",
            "clusters": [{"name": "loopback", "cluster": {"server": api.host}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "test"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        state = one_round(return_state=True)
    task = state.result()
    assert task["failed"] and KubernetesJobError.__name__ in task["message"], task
    assert "failed without a result: FailedJobs" in task["message"], task
    assert [m for m, *_ in api.requests].count("POST") == 1  # not retried: a failed JobSet is final
    APILogHandler().flush()  # the run's logs reach the server in batches
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120  # a hang bound: the server stores the batch when it gets to it
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            messages = [log.message for log in logs]
            if any(m.endswith("Failed, restarts 0") for m in messages) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert any(m.startswith("JobSet default/pd-k8s-task-round1-") and m.endswith("submitted (2 nodes x 1 processes)")
               for m in messages), messages
    assert any(m.endswith("Failed, restarts 0") for m in messages), messages


def _exited(code: int):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    proc.wait()
    return proc
