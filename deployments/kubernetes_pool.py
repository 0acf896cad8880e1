"""The base job template of the Kubernetes work pool: prefect-kubernetes' own template, with GPUs, a Secret
for the S3 and MLflow settings, node selector and tolerations as job variables.

    python -m deployments.deploy --pool-type kubernetes --pool pd-k8s --image REGISTRY/pd-worker:TAG

A flow run becomes a Kubernetes Job (rendered by the prefect-kubernetes worker from this template,
the deployment's job variables and the flow run) whose one container runs the project image
(docker/worker.Dockerfile) with:

- ``resources.limits["nvidia.com/gpu"]`` = job variable ``gpus`` (absent when null: a CPU pod);
- ``envFrom: [{secretRef: {name: env_secret}}]``: every key of that Secret becomes an environment
  variable (AWS_*, PD_STORAGE, MLFLOW_TRACKING_URI, ...). The template holds the Secret's name, never a
  value;
- ``nodeSelector`` = ``node_selector`` and ``tolerations`` = ``tolerations`` (job variables).

prefect-kubernetes' default template puts ``parallelism`` / ``completions`` in the pod spec, where the
Kubernetes schema has no such fields; here they sit in the Job spec. The module imports
prefect-kubernetes only inside :func:`base_job_template`.
"""

from __future__ import annotations

import copy
from typing import Any

POOL_TYPE = "kubernetes"
ENV_SECRET_NAME = "pd-env"  # noqa: S105 - the name of a Secret, not a value
CODE_DIR = "/opt/pd"  # where the image keeps the project (PD_CODE_DIR in docker/worker.Dockerfile)

EXTRA_VARIABLES: dict[str, dict[str, Any]] = {
    "gpus": {"title": "GPUs", "description": "nvidia.com/gpu limit of the flow-run pod (null: no GPU).",
             "anyOf": [{"type": "integer", "minimum": 0, "maximum": 64}, {"type": "null"}], "default": None},
    "env_secret": {"title": "Environment Secret",
                   "description": "Kubernetes Secret whose keys become the pod's environment (S3 and MLflow "
                                  "settings and credentials).",
                   "type": "string", "default": ENV_SECRET_NAME},
    "node_selector": {"title": "Node Selector", "description": "Pod nodeSelector (e.g. a GPU node pool's label).",
                      "type": "object", "additionalProperties": {"type": "string"}, "default": {}},
    "tolerations": {"title": "Tolerations", "description": "Pod tolerations (e.g. for tainted GPU nodes).",
                    "type": "array", "items": {"type": "object"}, "default": []},
}


def base_job_template(*, image: str | None = None, namespace: str | None = None,
                      env_secret: str = ENV_SECRET_NAME) -> dict[str, Any]:
    """prefect-kubernetes' default base job template with this project's variables (see the module docstring);
    ``image`` / ``namespace`` / ``env_secret`` become the variables' defaults."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    manifest = template["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    pod.pop("parallelism", None)
    pod.pop("completions", None)
    manifest["spec"].update({"parallelism": 1, "completions": 1})
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    (container,) = pod["containers"]
    container["envFrom"] = [{"secretRef": {"name": "{{ env_secret }}"}}]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    variables = template["variables"]["properties"]
    variables.update(copy.deepcopy(EXTRA_VARIABLES))
    variables["env_secret"]["default"] = env_secret
    if image is not None:
        variables["image"]["default"] = image
    if namespace is not None:
        variables["namespace"]["default"] = namespace
    return template


def deployment_job_variables(job_variables: dict[str, Any], *, gpus: int) -> dict[str, Any]:
    """A deployment's job variables on the Kubernetes pool: its env without CUDA_VISIBLE_DEVICES (the device
    plugin decides which GPUs a pod sees) and ``gpus`` GPUs for the flow-run pod (none for 0)."""
    out = copy.deepcopy(job_variables)
    env = out.get("env")
    if isinstance(env, dict):
        env.pop("CUDA_VISIBLE_DEVICES", None)
    if gpus > 0:
        out["gpus"] = gpus
    return out
