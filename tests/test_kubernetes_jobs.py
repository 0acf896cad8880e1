"""A round on several Kubernetes nodes, up to and including the API calls (no cluster here).

The JobSet is validated twice: the whole object against a strict JSON schema generated from the
JobSet v1alpha2 API models that kubeflow-trainer-api ships, and its embedded Job (pod template
included) against the Kubernetes 1.37 core schema with kubernetes-validate (strict). The round task's
code then talks to a loopback API (tests/k8s_loopback.py) whose controller runs the pods' own commands
here: the round completes with the weights of the local two-node launcher (tests/multinode_rounds.py),
a NaN in a pod comes back as the job's own error, and a cancelled wait deletes the JobSet.
"""

from __future__ import annotations

import copy
import os
import signal
import threading

import jsonschema
import pytest

from pd_core import jobs
from pd_core.train import NonFiniteLossError
from tasks import kubernetes as k8s_jobs
from tests.k8s_loopback import LoopbackJobSets
from tests.multinode_rounds import round_cfg

K8S_VERSION = "1.37.0"


K8S = ("runtime.launcher=kubernetes", "runtime.kubernetes.poll_s=0.2")


def _cfg(store, name: str, *extra: str) -> object:
    return round_cfg(store, name, extra=(*K8S, *extra))


def _strict(schema: dict) -> dict:
    """The schema with additionalProperties false wherever it lists properties (as kubernetes-validate's strict),
    and the embedded Job template left to the core schema (the generated models' JSON schema mangles the
    core types' oneOf wrappers such as resource quantities)."""
    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    out = copy.deepcopy(schema)
    out["$defs"]["IoK8sApiBatchV1JobTemplateSpec"] = {"type": "object"}
    walk(out)
    return out


def _validate(manifest: dict) -> None:
    import kubernetes_validate
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    jsonschema.validate(manifest, _strict(JobsetV1alpha2JobSet.model_json_schema(by_alias=True)))
    (rjob,) = manifest["spec"]["replicatedJobs"]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{manifest['metadata']['name']}-node-0"},
           "spec": rjob["template"]["spec"]}
    kubernetes_validate.validate(job, desired_version=K8S_VERSION, strict=True)


def _manifest(tmp_path, *extra: str) -> dict:
    cfg = _cfg(tmp_path / "store", "k8s-manifest", "runtime.kubernetes.gpus_per_node=8",
               "runtime.kubernetes.node_selector={gpu: h100}", *extra)
    teacher = jobs.CheckpointInfo(key="k", uri="s3://b/k", sha256="0" * 64, steps=8, round=0, trained=True,
                                  train_seconds=0.0, resumed_from=0)
    return k8s_jobs.jobset_manifest(cfg, name="pd-k8s-manifest-round1-0123abcd", job="round", teacher=teacher,
                                    round_index=1)


def test_the_jobset_passes_the_jobset_and_kubernetes_schemas_and_a_typo_does_not(tmp_path):
    import kubernetes_validate

    manifest = _manifest(tmp_path)
    _validate(manifest)
    pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"} and pod["nodeSelector"] == {"gpu": "h100"}
    assert container["envFrom"] == [{"secretRef": {"name": "pd-env"}}]
    assert not [e for e in container["env"] if e["name"].startswith(("AWS_", "MLFLOW_"))]  # from the Secret only
    command = " ".join(container["command"])
    assert "--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=$(PD_COORDINATOR):29400" in command
    assert "--rdzv-id=pd-k8s-manifest-round1-0123abcd" in command and "--max-restarts=2" in command
    typo = copy.deepcopy(manifest)
    typo["spec"]["failurePolicy"]["maxRestart"] = 1
    with pytest.raises(jsonschema.ValidationError, match="maxRestart"):
        _validate(typo)
    typo = copy.deepcopy(manifest)
    typo["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="gpus"):
        _validate(typo)


def _api(host: str):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = host
    return client.ApiClient(configuration)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_round_runs_as_a_jobset_and_ends_with_the_weights_of_the_local_two_node_round(two_node_round, tmp_path):
    store, teacher, local, _ = two_node_round
    lines: list[str] = []
    with LoopbackJobSets(mode="run", log_dir=tmp_path) as api:
        got = k8s_jobs.run_on_kubernetes(_cfg(store, "k8s-round"), job="round", round_index=1, teacher=teacher,
                                         api_client=_api(api.host), log_line=lines.append)
    assert got.trained and got.round == 1 and got.sha256 == local.sha256
    assert [m for m, *_ in api.requests][0] == "POST" and "DELETE" not in [m for m, *_ in api.requests]
    assert any(line.endswith("Running, restarts 0") for line in lines), lines
    assert lines[-1].endswith("Completed, restarts 0"), lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_jobset_raises_the_error_global_rank_zero_left_in_object_storage(mn_teacher, tmp_path):
    store, info = mn_teacher
    lines: list[str] = []
    with LoopbackJobSets(mode="run", log_dir=tmp_path) as api, pytest.raises(NonFiniteLossError):
        k8s_jobs.run_on_kubernetes(_cfg(store, "k8s-nan", "runtime.max_restarts=0"), job="round", round_index=1,
                                   teacher=info, fault_at_step=2, api_client=_api(api.host), log_line=lines.append)
    assert lines[-1].endswith("Failed, restarts 0"), lines


def test_a_failed_jobset_without_a_result_names_the_jobset(tmp_path):
    """The controller fails the pods before any rank ran (e.g. an image that cannot be pulled)."""
    cfg = _cfg(tmp_path / "store", "k8s-fail")
    with LoopbackJobSets(mode="run", log_dir=tmp_path) as api:
        api.start = lambda body: api.pods.__setitem__(body["metadata"]["name"], [_exited(1)])
        with pytest.raises(k8s_jobs.KubernetesJobError, match=r"JobSet default/pd-k8s-fail-teacher-\w+ failed "
                                                               r"without a result: FailedJobs"):
            k8s_jobs.run_on_kubernetes(cfg, job="teacher", api_client=_api(api.host))


def _exited(code: int):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    proc.wait()
    return proc


def test_cancelling_the_wait_deletes_the_jobset(tmp_path):
    """Prefect cancels a flow run with SIGTERM, which its engine turns into TerminationSignal in the flow."""
    from prefect.exceptions import TerminationSignal

    def on_sigterm(signum, _frame):
        raise TerminationSignal(signal=signum)

    cfg = _cfg(tmp_path / "store", "k8s-cancel")
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with LoopbackJobSets(mode="hold", log_dir=tmp_path) as api:
            threading.Thread(target=lambda: api.created.wait(60) and os.kill(os.getpid(), signal.SIGTERM),
                             daemon=True).start()
            with pytest.raises(TerminationSignal):
                k8s_jobs.run_on_kubernetes(cfg, job="teacher", api_client=_api(api.host))
    finally:
        signal.signal(signal.SIGTERM, previous)
    deletes = [(path, body) for method, path, body in api.requests if method == "DELETE"]
    assert len(deletes) == 1 and deletes[0][0].startswith("/apis/jobset.x-k8s.io/v1alpha2/namespaces/default/jobsets/")
    assert deletes[0][1]["propagationPolicy"] == "Foreground"
    assert api.objects == {}  # gone from the API
