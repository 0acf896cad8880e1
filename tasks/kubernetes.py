"""A training job on several Kubernetes nodes: a JobSet of ``runtime.nodes`` pods, each running torchrun.

    submit   JobSet jobset.x-k8s.io/v1alpha2: one replicated Job "node" of N indexed pods (completionMode
             Indexed, parallelism = completions = N), pod 0 the coordinator; a headless Service gives
             every pod a stable name, and the coordinator's (<name>-node-0-0.<name>) reaches each pod as
             an annotation, read into PD_COORDINATOR through the downward API.
    pod      python -m torch.distributed.run --nnodes N --nproc-per-node P --rdzv-backend c10d
                 --rdzv-endpoint $(PD_COORDINATOR):29400 --rdzv-id ID --max-restarts R
                 -m pd_core.distributed_job --config env:PD_JOB_CONFIG ... --out <storage.root>/jobs/<name>.json
             (the same command as pd_core.launch's local agents); every key of runtime.kubernetes.env_secret_name
             becomes the environment (S3 and MLflow settings), nvidia.com/gpu = gpus_per_node.
    wait     read the JobSet every ``poll_s``; log each change of phase and restart count (one line each);
             Completed -> read global rank 0's result from object storage; Failed -> that result's error,
             else the JobSet's message; past ``timeout_s`` the JobSet is deleted.
    cancel   anything that interrupts the wait (the flow run's cancellation, Ctrl-C, a timeout) deletes the
             JobSet (propagation Foreground: its Jobs and pods go with it) before it propagates.

A worker that dies inside a pod is torchrun's to restart (``--max-restarts``, from the in-round state);
a pod that dies (a node lost) makes the JobSet recreate all of them (``failurePolicy.maxRestarts``), and
the new pods resume the same way. The manifests are built from the kubernetes client's models (the pod
template) and kubeflow-trainer-api's JobSet v1alpha2 models; both imported lazily (the ``kubernetes`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from pd_core.config import Config
from pd_core.dist import DistributedJobError
from pd_core.jobs import CheckpointInfo
from pd_core.launch import RESTART_SAFE_ENV, job_args, rebuild_error, torchrun_command
from pd_core.malloc_env import with_malloc_tunables

log = logging.getLogger("tasks.kubernetes")

GROUP, VERSION, PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
REPLICATED_JOB = "node"
RDZV_PORT = 29400
COORDINATOR_ANNOTATION = "jobset.sigs.k8s.io/coordinator"
CONFIG_ENV, TEACHER_ENV = "PD_JOB_CONFIG", "PD_JOB_TEACHER"


class KubernetesJobError(DistributedJobError):
    """The JobSet failed, timed out or was refused, and global rank 0 left no result naming an error."""


def jobset_name(cfg: Config, *, job: str, round_index: int | None = None) -> str:
    """``pd-<pipeline>-<job>[<round>]-<8 hex>``: a DNS label of its own per attempt (also the rendezvous id)."""
    pipeline = re.sub(r"[^a-z0-9-]+", "-", cfg.pipeline.name.lower()).strip("-")[:24].strip("-") or "run"
    label = f"{job}{round_index}" if round_index is not None else job
    return f"pd-{pipeline}-{label}-{uuid.uuid4().hex[:8]}"


def result_url(cfg: Config, name: str) -> str:
    """Where global rank 0 of JobSet ``name`` writes its result JSON: ``<storage.root>/jobs/<name>.json``."""
    return f"{cfg.storage.root.rstrip('/')}/jobs/{name}.json"


def pod_template(cfg: Config, *, name: str, command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The pod template of every node (kubernetes client models, serialised as the API takes them)."""
    from kubernetes import client as k8s

    kube = cfg.runtime.kubernetes
    env_vars = [k8s.V1EnvVar(name="PD_COORDINATOR", value_from=k8s.V1EnvVarSource(
                    field_ref=k8s.V1ObjectFieldSelector(field_path=f"metadata.annotations['{COORDINATOR_ANNOTATION}']"))),
                k8s.V1EnvVar(name="PD_POD_IP", value_from=k8s.V1EnvVarSource(
                    field_ref=k8s.V1ObjectFieldSelector(field_path="status.podIP"))),
                *[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items())]]
    limits = {"nvidia.com/gpu": str(kube.gpus_per_node)} if kube.gpus_per_node else None
    container = k8s.V1Container(
        name="pd", image=kube.image, command=command, env=env_vars,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=kube.env_secret_name))],
        ports=[k8s.V1ContainerPort(container_port=RDZV_PORT, name="rdzv")],
        resources=k8s.V1ResourceRequirements(limits=limits) if limits else None)
    pod = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels={"app.kubernetes.io/name": "progressive-distillation", "pd/job": name}),
        spec=k8s.V1PodSpec(containers=[container], restart_policy="Never", node_selector=kube.node_selector or None,
                           service_account_name=kube.service_account))
    return k8s.ApiClient().sanitize_for_serialization(pod)


def jobset_manifest(cfg: Config, *, name: str, job: str, teacher: CheckpointInfo | None = None,
                    round_index: int | None = None, fault_at_step: int | None = None) -> dict[str, Any]:
    """The JobSet that runs ``job`` on ``runtime.nodes`` pods (see the module docstring), as a dict."""
    import dataclasses

    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    rt, kube = cfg.runtime, cfg.runtime.kubernetes
    args = job_args(config=f"env:{CONFIG_ENV}", job=job, out=result_url(cfg, name),
                    teacher=f"env:{TEACHER_ENV}" if teacher is not None else None,
                    round_index=round_index if job == "round" else None, fault_at_step=fault_at_step)
    command = torchrun_command(nproc=rt.nproc, module="pd_core.distributed_job", args=args, nodes=rt.nodes,
                               rdzv_endpoint=rt.rdzv_endpoint or f"$(PD_COORDINATOR):{RDZV_PORT}", rdzv_id=name,
                               max_restarts=rt.max_restarts, rdzv_timeout_s=rt.rdzv_timeout_s,
                               local_addr="$(PD_POD_IP)", python="python")
    env = {**with_malloc_tunables({}), **RESTART_SAFE_ENV, "PYTHONUNBUFFERED": "1",
           CONFIG_ENV: json.dumps(cfg.model_dump(mode="json"))}
    if teacher is not None:
        env[TEACHER_ENV] = json.dumps(dataclasses.asdict(teacher))
    pod = pod_template(cfg, name=name, command=command, env=env)
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "JobSet",
        "metadata": {"name": name, "namespace": kube.namespace,
                     "labels": {"app.kubernetes.io/name": "progressive-distillation", "pd/job": job}},
        "spec": {
            "coordinator": {"replicatedJob": REPLICATED_JOB, "jobIndex": 0, "podIndex": 0},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": {"maxRestarts": rt.max_restarts},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "ttlSecondsAfterFinished": 24 * 3600,  # the result is in object storage; the pods' logs stay a day
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": {
                "parallelism": rt.nodes, "completions": rt.nodes, "completionMode": "Indexed", "backoffLimit": 0,
                "activeDeadlineSeconds": kube.timeout_s, "template": pod}}}],
        },
    }
    return JobsetV1alpha2JobSet.from_dict(doc).to_dict()  # through the JobSet API's own models


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind and c.get("status") == "True"),
                None)


def phase_of(status: dict[str, Any]) -> str:
    """Completed, Failed, Running (some pod active) or Pending, from a JobSet's status."""
    for kind in ("Completed", "Failed"):
        if _condition(status, kind):
            return kind
    active = sum(int(r.get("active") or 0) for r in status.get("replicatedJobsStatus") or [])
    return "Running" if active else "Pending"


def _read_result(cfg: Config, name: str) -> dict[str, Any] | None:
    import fsspec

    try:
        with fsspec.open(result_url(cfg, name), "r", **cfg.storage.storage_options) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def run_on_kubernetes(cfg: Config, *, job: str, teacher: CheckpointInfo | None = None, round_index: int | None = None,
                      fault_at_step: int | None = None, api_client: Any = None,
                      log_line: Callable[[str], None] | None = None) -> CheckpointInfo:
    """Submit the JobSet, wait for it (logging phase and restarts), return global rank 0's CheckpointInfo.

    Raises the job's own error (same type where it is one of ours) or :class:`KubernetesJobError`;
    deletes the JobSet when the wait is interrupted. ``api_client``: a configured
    ``kubernetes.client.ApiClient`` (default: the in-cluster config, else ~/.kube/config).
    """
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    if api_client is None:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
        api_client = k8s.ApiClient()
    say = log_line or (lambda line: log.info("%s", line))
    kube = cfg.runtime.kubernetes
    name = jobset_name(cfg, job=job, round_index=round_index)
    body = jobset_manifest(cfg, name=name, job=job, teacher=teacher, round_index=round_index,
                           fault_at_step=fault_at_step)
    api = k8s.CustomObjectsApi(api_client)
    try:  # interrupted from here on (even inside the create call): the JobSet is deleted
        api.create_namespaced_custom_object(GROUP, VERSION, kube.namespace, PLURAL, body)
        say(f"JobSet {kube.namespace}/{name}: submitted ({cfg.runtime.nodes} nodes x {cfg.runtime.nproc} processes)")
        status = _wait(api, cfg, name=name, say=say)
    except BaseException:
        _delete(api, kube.namespace, name, say=say)
        raise
    result = _read_result(cfg, name)
    if result is not None and result.get("ok") and phase_of(status) == "Completed":
        return CheckpointInfo(**result["info"])
    if result is not None and not result.get("ok"):
        raise rebuild_error(result["error_type"], result["message"])
    failed = _condition(status, "Failed") or {}
    raise KubernetesJobError(f"JobSet {kube.namespace}/{name} {phase_of(status).lower()} without a result: "
                             f"{failed.get('reason', '')} {failed.get('message', '')}".rstrip())


def _wait(api: Any, cfg: Config, *, name: str, say: Callable[[str], None]) -> dict[str, Any]:
    kube = cfg.runtime.kubernetes
    deadline = time.monotonic() + kube.timeout_s
    seen: tuple[str, int] | None = None
    while True:
        doc = api.get_namespaced_custom_object(GROUP, VERSION, kube.namespace, PLURAL, name)
        status = doc.get("status") or {}
        now = (phase_of(status), int(status.get("restarts") or 0))
        if now != seen:
            say(f"JobSet {name}: {now[0]}, restarts {now[1]}")
            seen = now
        if now[0] in ("Completed", "Failed"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"JobSet {kube.namespace}/{name} still {now[0].lower()} after "
                               f"runtime.kubernetes.timeout_s={kube.timeout_s} s")
        time.sleep(kube.poll_s)


def _delete(api: Any, namespace: str, name: str, *, say: Callable[[str], None]) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            body=k8s.V1DeleteOptions(propagation_policy="Foreground"))
        say(f"JobSet {namespace}/{name}: deleted")
    except ApiException as err:
        if err.status != 404:
            raise
