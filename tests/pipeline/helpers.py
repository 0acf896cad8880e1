"""Helpers of the pipeline integration tests: the ``pd`` command, storage config, MLflow lookups.

``pd_command`` and ``run_pd`` are used by other test modules too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import MotoS3

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pd_command() -> list[str]:
    """The installed ``pd`` console script of this interpreter (``python -m flows.cli`` if not installed)."""
    script = Path(sys.executable).with_name("pd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


def run_pd(*args: str, cwd: Path, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``pd ARGS`` in a fresh process with this process' environment plus ``env``."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PD_DEBUG", None)  # errors must be one line, as a user sees them
    return subprocess.run([*pd_command(), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *, code: int, mentions: str) -> str:
    """Exit ``code``; stderr is exactly one line, ``error: ...`` naming ``mentions``; no traceback."""
    assert proc.returncode == code, \
        f"exit {proc.returncode}, want {code}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("error: ") and mentions in lines[0], lines[0]
    return lines[0]


def write_storage_config(path: Path, *, root: str, moto: MotoS3) -> Path:
    """A YAML config file that points the store at moto (no credentials: they come from the environment)."""
    path.write_text(yaml.safe_dump({"storage": {"root": root, "storage_options": moto.storage_options()}}))
    return path


def open_store(root: str, moto: MotoS3):
    from pd_core.store import CheckpointStore

    return CheckpointStore(root, storage_options=moto.storage_options())


def mlflow_client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def children_of(client, parent_id: str) -> dict[str, object]:
    """Child runs of ``parent_id`` by run name (``teacher``, ``round-01-8to4``, ...)."""
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=100)
    named = {r.info.run_name: r for r in runs}
    assert len(named) == len(runs), f"duplicate child run names under {parent_id}: {[r.info.run_name for r in runs]}"
    return named


def parent_of(client, child_run_id: str) -> str:
    return client.get_run(child_run_id).data.tags["mlflow.parentRunId"]


def as_plain_data(result: Any) -> dict:
    """A :class:`tasks.results.PipelineResult` as the tests read it.

    ``pipeline``, ``teacher`` and ``rounds`` (checkpoint infos as dicts), and the report's fields
    (``mlflow_link``, ``table``, ``report_uri`` when there is one, ``registered``).
    """
    report = {k: v for k, v in asdict(result.report).items() if v is not None}
    return {"pipeline": result.pipeline, "teacher": asdict(result.teacher),
            "rounds": [asdict(r) for r in result.rounds], **report}


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@dataclass
class Pipeline:
    """A finished pipeline and where it put everything."""

    name: str
    home: Path  # PD_HOME of the run (MLflow artifacts, journal)
    workdir: Path  # cwd for `pd` subprocesses
    root: str  # s3://bucket/prefix
    bucket: str
    config_path: Path
    tracking_uri: str
    moto: MotoS3
    result: dict
    seconds: float

    def run_again(self) -> tuple[dict, float]:
        from flows.pipeline import distillation_pipeline

        t0 = time.perf_counter()
        result = as_plain_data(distillation_pipeline(preset="smoke", name=self.name,
                                                     config_path=str(self.config_path), tracking_uri=self.tracking_uri))
        return result, time.perf_counter() - t0

    def pd(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run_pd(*args, cwd=self.workdir, env=env)

    @property
    def s3_env(self) -> dict[str, str]:
        """How a process configured by environment (the docker-compose worker does this) reaches moto."""
        return {"FSSPEC_S3_ENDPOINT_URL": self.moto.endpoint_url}
