"""Config resolution and the factories every task uses (store, tracker)."""

from __future__ import annotations

import functools
import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pd_core.config import Config, load_config
from tasks.env import prepare_environment, project_home, state_home
from tasks.prefect_server import is_embedded

if TYPE_CHECKING:
    from pd_core.store import CheckpointStore


def resolve_config(*, preset: str | None = None, config_path: str | None = None, overrides: Sequence[str] = (),
                   name: str | None = None, storage: str | None = None, tracking_uri: str | None = None,
                   teacher_uri: str | None = None, restart_from: int | None = None) -> Config:
    """The resolved config: preset, then file, then --set overrides, then the named CLI options.

    Embedded defaults are made concrete here: a relative storage root becomes an absolute path
    under the project home, no tracking URI becomes ``sqlite:///<home>/mlflow.db``. The process
    environment is prepared after validation (a refused config creates no folder): Prefect's home
    goes under ./.pd only when the run uses an embedded default there (see :func:`tasks.env.state_home`).
    """
    home = project_home()
    # A worker configured by environment (docker-compose sets these) needs no per-run options.
    storage = storage or os.environ.get("PD_STORAGE") or None
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    extra = list(overrides)
    if name:
        extra.append(f"pipeline.name={name}")
    if storage:
        extra.append(f"storage.root={storage}")
    if tracking_uri:
        extra.append(f"tracking.tracking_uri={tracking_uri}")
    if teacher_uri:
        extra.append(f"pipeline.teacher_uri={json.dumps(teacher_uri)}")  # a string, never YAML ("diffusers:" is a map)
    if restart_from is not None:
        extra.append(f"pipeline.restart_from={int(restart_from)}")
    cfg = load_config(preset=preset, path=config_path, overrides=extra)
    embedded = cfg.storage.root.startswith(".pd/") or not cfg.tracking.tracking_uri
    prepare_environment(local_state=embedded)
    updates: dict[str, Any] = {}
    root = cfg.storage.root
    if "://" not in root:
        # ".pd/..." means "inside the project home" ($PD_HOME, default ./.pd); other relative paths are
        # relative to the working directory. Either way the URIs we print and store are absolute.
        path = home / root[len(".pd/"):] if root.startswith(".pd/") else Path(root)
        updates["storage"] = cfg.storage.model_copy(update={"root": str(path.resolve())})
    if not cfg.tracking.tracking_uri:
        updates["tracking"] = cfg.tracking.model_copy(update={"tracking_uri": f"sqlite:///{home / 'mlflow.db'}"})
    return cfg.model_copy(update=updates) if updates else cfg


GPU_TAG = "gpu"  # the tag deployments/deploy.py puts a concurrency limit on


def gpu_task_tags(task_tags: Sequence[str] | None, *, api_url: str | None) -> list[str]:
    """Tags for the GPU tasks: ``task_tags`` when given; by default ``gpu`` on a standing Prefect server only.

    The embedded temporary server of a plain ``pd run`` (Prefect's own, or the one ``pd run`` starts
    and marks: ``tasks.prefect_server.is_embedded``) belongs to one process, so no limit there can
    coordinate anything, and every tagged task would still pay the concurrency-slot calls (about 2 s
    on some task runs here: the largest part of the per-round orchestration overhead).
    """
    if task_tags is not None:
        return list(task_tags)
    return [GPU_TAG] if api_url and not is_embedded(api_url) else []


def warm_up_steps(cfg: Config) -> list[Callable[[], object]]:
    """Once-per-process work a training run of ``cfg`` does anyway (done while Prefect's server starts).

    MLflow's store (created when it is a new sqlite file) and its map of installed packages (built by
    the first model logged), ``torch._dynamo`` (imported by the first optimizer), scikit-learn's
    datasets (the digits data).
    """
    steps: list[Callable[[], object]] = [lambda: tracker_for(cfg).warm_up()]
    steps.append(lambda: importlib.import_module("torch._dynamo"))
    if cfg.data.name == "digits":
        steps.append(lambda: importlib.import_module("sklearn.datasets"))
    return steps


def open_store(cfg: Config) -> CheckpointStore:
    """The checkpoint store named by ``storage.root`` (credentials come from the environment)."""
    from pd_core import jobs  # torch: not needed to resolve a config

    return jobs.open_store(cfg)


def local_root(root: str) -> Path | None:
    """The folder of a local storage root (a path or file:// URL); None for an object store."""
    if "://" not in root:
        return Path(root).expanduser().absolute()
    if root.startswith("file://"):
        return Path(unquote(urlsplit(root).path)).absolute()
    return None


def journal_folder(cfg: Config) -> Path:
    """Where the run's MLflow outage journals live: with the run's state, never in the working folder.

    ``<storage.root>/.mlflow-journals`` for a local store (a dot-folder: the store never lists it);
    ``<state home>/mlflow-journals`` for an object store ($PD_HOME, else $XDG_STATE_HOME/pd).
    """
    local = local_root(cfg.storage.root)
    return local / ".mlflow-journals" if local is not None else state_home(local=False) / "mlflow-journals"


def tracker_for(cfg: Config):
    """The process's Tracker for ``cfg.tracking`` (imported lazily: MLflow is slow to import).

    One per (URI, experiment, journal) in a process: every task of a pipeline shares it, so an
    MLflow outage is probed and reported once, not once per task. Its journal is the tracking
    URI's own (:func:`tasks.tracking.journal.journal_name`) in :func:`journal_folder`.
    """
    from tasks.tracking.journal import journal_name

    uri = cfg.tracking.tracking_uri
    journal = journal_folder(cfg) / journal_name(uri)
    # artifacts None: next to a sqlite/file store (Tracker's default), on the server for a remote one
    return _tracker(uri, cfg.tracking.experiment, cfg.tracking.enabled, None, str(journal))


def start_pipeline_run(tracker, cfg: Config, *, tags: dict[str, str],
                       params: dict[str, str] | None = None) -> str | None:
    """A pipeline's MLflow parent run, named after the pipeline: the settings that tell pipelines apart as
    params (``pipeline_params``, plus ``params``: a sweep point's grid values), the whole resolved config as
    the artifact ``config.yaml`` (secret-named values ``***``)."""
    import yaml

    from pd_core.config import pipeline_params
    from tasks.tracking.redact import redacted_mapping, redactor

    run_id = tracker.start_run(run_name=cfg.pipeline.name, params={**pipeline_params(cfg), **(params or {})}, tags=tags)
    dump = redacted_mapping(cfg.model_dump(mode="json"), redactor())
    tracker.log_text(run_id, yaml.safe_dump(dump, sort_keys=False, default_flow_style=None, width=100),
                     artifact_file=CONFIG_ARTIFACT)
    return run_id


CONFIG_ARTIFACT = "config.yaml"  # the resolved config among a pipeline run's artifacts


@functools.lru_cache(maxsize=8)
def _tracker(uri: str, experiment: str, enabled: bool, artifacts: str | None, journal: str):
    from tasks.tracking import Tracker

    return Tracker(tracking_uri=uri, experiment=experiment, enabled=enabled, artifact_location=artifacts,
                   journal_path=journal)
