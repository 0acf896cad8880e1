"""The calls a :class:`~tasks.tracking.Tracker` applies to MLflow, each from its JSON payload alone.

A payload is what the journal stores, so replaying a journaled call is the same call. Placeholder run
ids (``pending-...``) are mapped to real ones here; one whose run creation is still journaled raises
:class:`~tasks.tracking.errors.Unresolved`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS, MLFLOW_PARENT_RUN_ID

from tasks.tracking.errors import Unresolved
from tasks.tracking.journal import PENDING_PREFIX, Journal
from tasks.tracking.sampler_model import MODEL_NAME, log_model, sha256_file
from tasks.tracking.uris import local_store_path
from tasks.tracking.views import (
    DESCRIPTION_TAG,
    EXPERIMENT_DESCRIPTION,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    VIEW_TAG_PREFIX,
    merged_columns,
    view_columns,
    view_tag,
)

log = logging.getLogger("tasks.tracking")  # the package's one logger: callers filter records on this name

# MLflow's own limits (mlflow/utils/validation.py): larger batches are sent in chunks.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def _tag_clauses(tags: dict[str, str]) -> list[str]:
    """``tags.`name` = 'value'`` search clauses (quotes and backslashes escaped)."""
    def quoted(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return [f"tags.`{k}` = {quoted(v)}" for k, v in tags.items()]


class MlflowOps:
    """Applies calls to one experiment through one ``MlflowClient`` with explicit run ids.

    Every error is raised to the caller, which decides whether to journal, drop or report it.
    ``warn_once`` reports what MLflow accepted only in part (re-logged params with other values).
    """

    def __init__(self, *, tracking_uri: str, experiment: str, artifact_location: str | None, journal: Journal,
                 warn_once: Callable[[str], None]):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.journal = journal
        self._warn_once = warn_once
        self._experiment_id_cache: str | None = None
        self._ids: dict[str, str] = {}  # placeholder -> real run id, for callers still holding placeholders
        self._lock = threading.Lock()

    @functools.cached_property
    def client(self) -> MlflowClient:
        """The client every call goes through (created on first use)."""
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def apply(self, op: str, payload: dict[str, Any], *, replaying: bool = False) -> Any:
        """Apply call ``op`` with ``payload``; ``replaying`` when it comes from the journal."""
        if op == "start_run":  # the one call that must know: a partly failed replay may have made the run
            return self._op_start_run(payload, replaying=replaying)
        handler: Callable[[dict[str, Any]], Any] = getattr(self, f"_op_{op}")
        return handler(payload)

    def experiment_id(self) -> str:
        """Get-or-create the experiment (restoring it if deleted), declared a model-training experiment; cached.

        The declaration is the ``mlflow.experimentKind`` tag (``tasks.tracking.views``); an experiment
        that already has a kind keeps it (a user may have changed it in the UI).
        """
        if self._experiment_id_cache is not None:
            return self._experiment_id_cache
        with self._lock:
            client = self.client
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    exp_id = client.create_experiment(self.experiment, artifact_location=self.artifact_location,
                                                      tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING,
                                                            DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION})
                    where = f" (artifacts at {self.artifact_location})" if self.artifact_location else ""
                    log.info("MLflow experiment %r created%s", self.experiment, where)
                except MlflowException as err:
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp_id = client.get_experiment_by_name(self.experiment).experiment_id  # lost a creation race
            else:
                exp_id = found.experiment_id
                if found.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
                    log.info("MLflow experiment %r was deleted: restored", self.experiment)
                if EXPERIMENT_KIND_TAG not in found.tags:
                    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
                if DESCRIPTION_TAG not in found.tags:  # a description a user wrote stays
                    client.set_experiment_tag(exp_id, DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION)
            self._experiment_id_cache = exp_id
        return exp_id

    def experiment_id_quiet(self) -> str | None:
        """The experiment id, or None when MLflow cannot say (for display only)."""
        try:
            return self.experiment_id()
        except Exception:  # noqa: BLE001 - only for display
            return None

    def resolve(self, run_id: str) -> str:
        """Real run id for a placeholder (or the id itself); Unresolved while its creation is journaled."""
        if not run_id.startswith(PENDING_PREFIX):
            return run_id
        if run_id not in self._ids:
            self._ids.update(self.journal.ids())
        if run_id not in self._ids:
            raise Unresolved(f"run {run_id} is not created yet (journaled in {self.journal.path})")
        return self._ids[run_id]

    def resolve_quiet(self, run_id: str) -> str | None:
        """Like :meth:`resolve`, None while the run creation is journaled."""
        try:
            return self.resolve(run_id)
        except Unresolved:
            return None

    def search_run(self, tags: dict[str, str]) -> str | None:
        """Most recent run of the experiment carrying all ``tags``."""
        clause = " and ".join(_tag_clauses(tags))
        runs = self.client.search_runs([self.experiment_id()], filter_string=clause, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def search_runs(self, tags: dict[str, str], *, running_only: bool = False) -> list[str]:
        """Ids of every run of the experiment carrying all ``tags`` (only RUNNING ones when ``running_only``)."""
        clauses = _tag_clauses(tags)
        if running_only:
            clauses.append("attributes.status = 'RUNNING'")
        runs = self.client.search_runs([self.experiment_id()], filter_string=" and ".join(clauses), max_results=1000)
        return [r.info.run_id for r in runs]

    def _map_placeholders(self, tags: dict[str, str]) -> dict[str, str]:
        """Tag values that are placeholder run ids (e.g. a parent id tag) become the real ids."""
        return {k: (self.resolve(v) if v.startswith(PENDING_PREFIX) else v) for k, v in tags.items()}

    def _op_start_run(self, p: dict[str, Any], *, replaying: bool) -> str:
        placeholder = p["placeholder"]
        real = self.resolve_quiet(placeholder) if replaying else None
        if real is None:  # not created by an earlier, partly failed replay
            tags = self._map_placeholders(p["tags"])
            if p["parent_run_id"]:
                tags[MLFLOW_PARENT_RUN_ID] = self.resolve(p["parent_run_id"])
            run = self.client.create_run(self.experiment_id(), start_time=p["start_time"], tags=tags,
                                         run_name=p["run_name"])
            real = run.info.run_id
            self._ids[placeholder] = real
            if replaying:
                self.journal.add_id(placeholder, real)
            log.info("MLflow run %s (%s) started%s", real, p["run_name"],
                     f" under {tags[MLFLOW_PARENT_RUN_ID]}" if p["parent_run_id"] else "")
        try:
            self._op_log_params({"run_id": real, "params": p["params"]})
        except Exception:
            # The run exists: if this call is journaled, its replay must reuse the run, not make another.
            with contextlib.suppress(Exception):
                self.journal.add_id(placeholder, real)
            raise
        return real

    def _op_log_params(self, p: dict[str, Any]) -> None:
        run_id = self.resolve(p["run_id"])
        items = list(p["params"].items())
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = dict(items[start:start + MAX_PARAMS_TAGS_PER_BATCH])
            try:
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in chunk.items()], synchronous=True)
            except MlflowException as err:
                if "Changing param values is not allowed" not in err.message:
                    raise
                self._log_new_params_only(run_id, chunk)

    def _log_new_params_only(self, run_id: str, params: dict[str, str]) -> None:
        """A resumed run re-logs its params: keep MLflow's values, log only new keys, say which differ."""
        existing = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        fresh = [Param(k, v) for k, v in params.items() if k not in existing]
        if fresh:
            self.client.log_batch(run_id, params=fresh, synchronous=True)
        if changed:
            self._warn_once(f"run {run_id}: params {', '.join(changed)} differ from the values already "
                            f"logged; MLflow keeps the first values")

    def _op_log_metrics(self, p: dict[str, Any]) -> None:
        run_id = self.resolve(p["run_id"])
        metrics = [Metric(k, float(v), p["timestamp"], p["step"]) for k, v in p["metrics"].items()]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH], synchronous=True)

    def _op_set_tags(self, p: dict[str, Any]) -> None:
        run_id = self.resolve(p["run_id"])
        items = [RunTag(k, v) for k, v in self._map_placeholders(p["tags"]).items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[start:start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    def _op_log_artifact(self, p: dict[str, Any]) -> None:
        run_id = self.resolve(p["run_id"])
        if Path(p["local_path"]).is_dir():
            self.client.log_artifacts(run_id, p["local_path"], p["artifact_path"])
        else:
            self.client.log_artifact(run_id, p["local_path"], p["artifact_path"])

    def _op_log_text(self, p: dict[str, Any]) -> None:
        self.client.log_text(self.resolve(p["run_id"]), p["text"], p["artifact_file"])

    def _op_log_table(self, p: dict[str, Any]) -> None:
        run_id = self.resolve(p["run_id"])
        self.client.log_text(run_id, p["csv"], p["csv_file"])
        self.client.log_text(run_id, p["json"], p["json_file"])
        # The tag mlflow.log_table sets, so the UI lists the JSON as a table (overwrite, not append:
        # a rerun re-logs the whole table).
        current = json.loads(self.client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": p["json_file"], "type": "table"}
        if entry not in current:
            self.client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*current, entry]))

    def _op_end_run(self, p: dict[str, Any]) -> None:
        self.client.set_terminated(self.resolve(p["run_id"]), status=p["status"], end_time=p["end_time"])

    def _op_reopen_run(self, p: dict[str, Any]) -> str:
        """A finished run back to RUNNING (a pipeline continuing under the parent another flow made)."""
        run_id = self.resolve(p["run_id"])
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _op_save_runs_view(self, p: dict[str, Any]) -> None:
        """Create or extend a saved view of the runs table (columns merged with those already saved)."""
        experiment_id = self.experiment_id()
        key = VIEW_TAG_PREFIX + p["view_id"]
        existing, created = view_columns(self.client.get_experiment(experiment_id).tags.get(key))
        value = view_tag(name=p["name"], columns=merged_columns(existing, p["columns"]),
                         search_filter=p["search_filter"], created_ms=created or p["timestamp"],
                         updated_ms=p["timestamp"])
        self.client.set_experiment_tag(experiment_id, key, value)

    def _op_set_alias(self, p: dict[str, Any]) -> None:
        self.client.set_registered_model_alias(p["registered_model"], p["alias"], p["version"])
        log.info("MLflow model %s@%s -> version %s", p["registered_model"], p["alias"], p["version"])

    def _op_log_sampler_model(self, p: dict[str, Any]) -> tuple[str, str | None]:
        run_id = self.resolve(p["run_id"])
        sha = sha256_file(p["weights_path"])
        tags = {**p["tags"], "pd.weights_sha256": sha, "pd.format": "safetensors"}
        model_id = log_model(self.client, run_id=run_id, weights_path=p["weights_path"], manifest=p["manifest"],
                             sha256=sha, tags=tags, name=p.get("model_name") or MODEL_NAME)  # journals before names
        uri = f"models:/{model_id}"
        log.info("MLflow model %s logged for run %s (weights sha256 %s)", uri, run_id, sha[:12])
        version = None
        if p["registered_model"]:
            version = self._register(p["registered_model"], model_id=model_id, run_id=run_id, tags=tags,
                                     description=p.get("description"))
            # "alias": one name, in journals written before "aliases" existed
            for alias in p.get("aliases") or ([p["alias"]] if p.get("alias") else []):
                self._op_set_alias({"registered_model": p["registered_model"], "alias": alias, "version": version})
        return uri, version

    def _register(self, name: str, *, model_id: str, run_id: str, tags: dict[str, str],
                  description: str | None = None) -> str:
        """Create the registered model if missing and a version from the logged model (with ``description``:
        what the registry's version page says of it); its number."""
        client = self.client
        try:
            client.create_registered_model(name)
            log.info("MLflow registered model %r created", name)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # A local (sqlite/file) registry resolves a "models:/<id>" source through MLflow's GLOBAL tracking
        # URI (SqlAlchemyStore.create_model_version, a TODO there), so give it the logged model's artifact
        # location; a server resolves "models:/<id>" itself, which also links the version to the model.
        if local_store_path(self.tracking_uri) is not None:
            source = client.get_logged_model(model_id).artifact_location
        else:
            source = f"models:/{model_id}"
        version = client.create_model_version(name=name, source=source, run_id=run_id, tags=tags, model_id=model_id,
                                              description=description)
        log.info("MLflow model %s version %s registered", name, version.version)
        return str(version.version)
