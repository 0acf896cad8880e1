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

