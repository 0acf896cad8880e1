"""The sections that say where a run keeps its results and what it runs on: storage, tracking, runtime, pipeline.

The credential checks of :mod:`pd_core.config.base` keep secrets out of every URL and storage
option here: credentials come from the environment (or fsspec's own config), never from a config.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from pd_core.config.base import _no_credentials_in_url, _secret_option_paths, _Section
from pd_core.config.urls import check_protocols

_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_K8S_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # an RFC 1123 label


class StorageConfig(_Section):
    """The checkpoint store (pd_core.store) over fsspec."""

    root: str = Field(".pd/store", description="Path or fsspec URL (file://, s3://, memory://) of the store.")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="fsspec options such as endpoint_url or "
                                                        "client_kwargs; never credentials (use env vars).")

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty path or URL, got ''")
        check_protocols(value)
        return _no_credentials_in_url(value)  # type: ignore[return-value]

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        secret = _secret_option_paths(value)
        if secret:
            raise ValueError(f"must not contain credentials (found {', '.join(secret)}); set them as environment "
                             "variables such as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or in fsspec's config, "
                             "so they are never logged or hashed")
        return value


class TrackingConfig(_Section):
    """MLflow tracking (used by tasks/, never by pd_core)."""

    enabled: bool = Field(True, description="Log runs, params, metrics and artifacts to MLflow.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; null = sqlite:///.pd/mlflow.db.")
    experiment: str = Field("progressive-distillation", min_length=1, description="MLflow experiment name.")
    registered_model: str | None = Field(None, description="Register the final student under this name; "
                                                           "null = do not register.")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return _no_credentials_in_url(value)


class KubernetesConfig(_Section):
    """Where a multi-node job runs on Kubernetes (a Kubeflow PyTorchJob; see tasks/kubernetes.py)."""

    namespace: str = Field("default", pattern=_K8S_NAME, description="Namespace of the PyTorchJob.")
    image: str = Field("progressive-distillation-worker:latest", min_length=1, max_length=512,
                       description="Container image of every node (docker/worker.Dockerfile).")
    gpus_per_node: int = Field(0, ge=0, le=64, description="nvidia.com/gpu limit of each node's pod (0: CPU nodes).")
    env_secret_name: str = Field("pd-env", pattern=_K8S_NAME,
                                 description="Kubernetes Secret whose keys become the pods' environment (S3 and "
                                             "MLflow settings and credentials); never values in a manifest.")
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32, description="Pod nodeSelector.")
    service_account: str | None = Field(None, pattern=_K8S_NAME, description="Pods' service account.")
    poll_s: float = Field(5.0, gt=0, le=300, description="Seconds between job status reads.")
    timeout_s: int = Field(7 * 86400, ge=60, le=90 * 86400, description="Longest a job may run before it is deleted.")


class RuntimeConfig(_Section):
    """Where and how the computation runs."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision of training and evaluation sampling; auto: bf16 on GPUs and on "
                            "CPUs with native bf16 (avx512_bf16 / amx_bf16), else fp32; fp32: no autocast.")
    channels_last: bool | None = Field(None, description="channels_last memory format; null = on GPU only "
                                                         "(slower on CPUs, with bf16 too).")
    compile: bool = Field(False, description="torch.compile the networks.")
    nproc: int = Field(1, ge=1, description="Processes (GPUs) per training job.")
    nodes: int = Field(1, ge=1, le=256,
                       description="Nodes of a training job (torchrun agents, c10d rendezvous). The global batch is "
                                   "batch_size x nproc whatever the node count: each process takes "
                                   "batch_size / nodes examples (so batch sizes must divide by it).")
    launcher: Literal["local", "kubernetes"] = Field(
        "local", description="Where a job of nodes > 1 runs: local = one torchrun agent per node on this machine "
                             "(loopback; tests and benchmarks); kubernetes = a Kubeflow PyTorchJob "
                             "(runtime.kubernetes).")
    rdzv_endpoint: str | None = Field(None, pattern=r"^[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}$",
                                      description="host:port of the c10d rendezvous; null = 127.0.0.1 and a free "
                                                  "port (local launcher) or the master pod (kubernetes).")
    max_restarts: int = Field(3, ge=0, le=100, description="torchrun --max-restarts of a multi-node job: a dead worker "
                                                          "restarts the job, which resumes from its in-round state.")
    rdzv_timeout_s: int = Field(900, ge=10, le=86400, description="How long the nodes wait for each other to join.")
    kubernetes: KubernetesConfig = Field(default_factory=lambda: KubernetesConfig(),
                                         description="The PyTorchJob a multi-node job runs as (launcher=kubernetes).")
    num_workers: int = Field(0, ge=0, description="Data-loading worker processes.")
    threads: int | None = Field(None, ge=1, le=1024,
                                description="torch intra-op threads; null = on a CPU, the cores other processes "
                                            "leave idle, re-decided as the load changes (on a GPU, torch's default).")


class PipelineConfig(_Section):
    """Identity of a pipeline run (names the store namespace and the MLflow parent run)."""

    name: str = Field("default", description="Pipeline name: letters, digits, '.', '_', '-' (used in store keys).")
    seed: int = Field(0, ge=0, description="Pipeline-level seed (mixed into task seeds).")
    teacher_uri: str | None = Field(None, description="Import this teacher instead of training one: a checkpoint "
                                                      "folder URL, or diffusers:<folder or fsspec URL> for a "
                                                      "diffusers UNet2DModel with its scheduler config.")
    restart_from: int | None = Field(None, ge=0, description="Retrain round N and every later round (0 or "
                                                            "'teacher': the teacher too), replacing their checkpoints; "
                                                            "what comes before N is kept as it is. null = resume.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _PIPELINE_NAME.match(value) or ".." in value:
            raise ValueError("must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit "
                             f"(it becomes part of storage keys), got {value!r}")
        return value

    @field_validator("teacher_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("diffusers:"):
            if not value[len("diffusers:"):].strip():
                raise ValueError("must name a folder after 'diffusers:' (diffusers:<folder or fsspec URL>), "
                                 f"got {value!r}")
            _no_credentials_in_url(value[len("diffusers:"):])
        return _no_credentials_in_url(value)

    @field_validator("restart_from", mode="before")
    @classmethod
    def _teacher_is_zero(cls, value: Any) -> Any:
        return 0 if isinstance(value, str) and value.strip().lower() == "teacher" else value

