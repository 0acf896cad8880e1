"""The :class:`Tracker`: what tasks call to track a run, and how an MLflow outage is absorbed.

A tracking outage never raises into training code. A call that fails because MLflow is unreachable
is appended to a JSONL journal; one warning line per outage says where; :meth:`Tracker.flush` replays
the journal in order (run creations map their placeholder ids to the real ones). Calls that MLflow
refuses for good (bad input) are logged as one warning line and dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tasks.tracking.errors import Unresolved, is_transient, one_line
from tasks.tracking.journal import PENDING_PREFIX, Journal, default_journal_path, replay_payload
from tasks.tracking.ops import MlflowOps
from tasks.tracking.redact import clean_key, clean_params, clean_tags, redact, redacted_copy, redactor
from tasks.tracking.sampler_model import MODEL_NAME
from tasks.tracking.uris import default_artifact_location, local_store_path, normalise_uri, scheme
from tasks.tracking.views import (
    LOCAL_UI_URL,
    artifact_url,
    charts_url,
    compare_url,
    experiment_url,
    metric_column,
    run_url,
    view_url,
)

if TYPE_CHECKING:
    import pandas

log = logging.getLogger("tasks.tracking")  # the package's one logger: callers filter records on this name

# Short HTTP retries: MLflow's defaults (7 retries, backoff 2, 120 s timeout) stall an outage for minutes;
# the journal makes retrying here pointless. Set only where the user has not set them.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
_OFFLINE_HYGIENE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# One line per event: no "View run ... at" lines on every finished run, no download progress bars.
_QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
UI_URL_ENV = "PD_MLFLOW_UI_URL"  # the MLflow server as people's browsers reach it, when not the tracking URI
_STASHED = ("local_path", "weights_path")  # payload keys naming files the journal keeps its own copy of


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """MLflow tracking for one experiment through ``MlflowClient`` with explicit run ids.

    Only explicit run ids, never MLflow's fluent API: tasks may run in threads, and the fluent API
    keeps a global active run and a global tracking URI.

    Never raises into training code: unreachable-server failures are journaled to ``journal_path``
    and replayed by :meth:`flush` (also tried automatically, at most every ``retry_interval_s``
    seconds, before the next call); refused calls are logged and dropped. While MLflow is
    unreachable :meth:`start_run` returns a placeholder id (``pending-...``) that every other method
    accepts and that the replay maps to the real run id.

    Links (:meth:`run_link`, :meth:`artifact_url`, ...) point at ``ui_url``: the server as a browser
    reaches it (default ``$PD_MLFLOW_UI_URL``, else the tracking URI; a worker may reach MLflow under
    another name), or, for a local store, where ``mlflow ui`` serves it.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, enabled: bool = True,
                 artifact_location: str | None = None, journal_path: str | None = None,
                 retry_interval_s: float = 30.0, ui_url: str | None = None):
        self.enabled = enabled
        self.tracking_uri = normalise_uri(tracking_uri)
        self.is_server = scheme(self.tracking_uri) in ("http", "https")
        default_ui = (os.environ.get(UI_URL_ENV) or self.tracking_uri) if self.is_server else LOCAL_UI_URL
        self.ui_url = redact((ui_url or default_ui).rstrip("/"))
        self.experiment = experiment
        self.artifact_location = artifact_location or default_artifact_location(self.tracking_uri)
        self.retry_interval_s = retry_interval_s
        self._journal = Journal(Path(journal_path) if journal_path else default_journal_path(self.tracking_uri))
        self._ops = MlflowOps(tracking_uri=self.tracking_uri, experiment=experiment,
                              artifact_location=self.artifact_location, journal=self._journal,
                              warn_once=self._warn_once)
        self._last_probe = -math.inf
        self._outage_warned = False
        self._warned: set[str] = set()
        if not enabled:
            return
        for name, value in {**_HTTP_DEFAULTS, **_OFFLINE_HYGIENE, **_QUIET}.items():
            os.environ.setdefault(name, value)
        local = local_store_path(self.tracking_uri)
        if local is not None:
            # sqlite refuses a file in a missing folder; a file store wants its parent.
            local.parent.mkdir(parents=True, exist_ok=True)

    @property
    def journal_path(self) -> str:
        return str(self._journal.path)

    @property
    def pending(self) -> int:
        """Calls in the journal, not yet in MLflow."""
        return self._journal.count() if self.enabled else 0

    def start_run(self, *, run_name: str, parent_run_id: str | None = None,
                  params: dict[str, object] | None = None, tags: dict[str, str] | None = None) -> str | None:
        """Create a run (a child of ``parent_run_id`` when given) with params and tags; its id.

        None when tracking is disabled; a ``pending-...`` placeholder while MLflow is unreachable.
        """
        if not self.enabled:
            return None
        red = redactor()
        payload = {"placeholder": PENDING_PREFIX + uuid.uuid4().hex, "run_name": red(run_name),
                   "parent_run_id": parent_run_id, "params": clean_params(params or {}, red),
                   "tags": clean_tags(tags, red), "start_time": _now_ms()}
        return self._submit("start_run", payload, offline_result=payload["placeholder"])

    def find_run(self, *, tags: dict[str, str]) -> str | None:
        """Most recent active run of the experiment carrying all ``tags`` (e.g. a round's child run)."""
        if not self.enabled:
            return None
        wanted = clean_tags(tags, redactor())
        if self._journal.nonempty() and not self._replay_if_due():
            return self._find_pending(wanted)
        try:
            return self._ops.search_run(wanted)
        except Exception as err:  # noqa: BLE001 - never raise into training code
            self._warn_once(f"find_run failed: {one_line(err)}")
            return self._find_pending(wanted)

    def log_params(self, run_id: str | None, params: dict[str, object]) -> None:
        """Log params (nested dicts flattened, values str()-ed, redacted, long values truncated)."""
        if run_id is None or not self.enabled or not params:
            return
        self._submit("log_params", {"run_id": run_id, "params": clean_params(params, redactor())})

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], *, step: int | None = None) -> None:
        """Log metrics at ``step`` (0 when None), timestamped now (replays keep the timestamp)."""
        if run_id is None or not self.enabled or not metrics:
            return
        red = redactor()
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[clean_key(key, red)] = float(value)
            except (TypeError, ValueError):
                self._warn_once(f"metric {key!r} is not a number ({type(value).__name__}): not logged")
        if values:
            self._submit("log_metrics", {"run_id": run_id, "metrics": values, "step": int(step or 0),
                                         "timestamp": _now_ms()})

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        """Set tags (redacted, truncated)."""
        if run_id is None or not self.enabled or not tags:
            return
        self._submit("set_tags", {"run_id": run_id, "tags": clean_tags(tags, redactor())})

    def log_artifact(self, run_id: str | None, local_path: str, *, artifact_path: str | None = None) -> None:
        """Upload a file or folder; text files are redacted first (a copy is uploaded, not the original)."""
        if run_id is None or not self.enabled:
            return
        with tempfile.TemporaryDirectory(prefix="pd-redacted-") as tmp:
            try:
                source = redacted_copy(Path(local_path), Path(tmp))
            except OSError as err:
                self._warn_once(f"artifact {local_path} cannot be read: {one_line(err)}")
                return
            self._submit("log_artifact", {"run_id": run_id, "local_path": str(source), "artifact_path": artifact_path})

    def log_table(self, run_id: str | None, df: pandas.DataFrame, *, artifact_file: str) -> None:
        """Log a table as CSV at ``artifact_file`` and as mlflow.log_table JSON next to it (.json)."""
        if run_id is None or not self.enabled:
            return
        red = redactor()
        stem = artifact_file[:-4] if artifact_file.endswith((".csv", ".json")) else artifact_file
        stem = stem[:-1] if stem.endswith(".") else stem
        payload = {"run_id": run_id, "csv_file": stem + ".csv", "json_file": stem + ".json",
                   "csv": red(df.to_csv(index=False)),
                   "json": red(df.to_json(orient="split", index=False, date_format="iso"))}
        self._submit("log_table", payload)

    def log_text(self, run_id: str | None, text: str, *, artifact_file: str) -> None:
        """Log ``text`` (redacted) as the artifact ``artifact_file``."""
        if run_id is None or not self.enabled:
            return
        self._submit("log_text", {"run_id": run_id, "text": redact(text), "artifact_file": artifact_file})

    def end_run(self, run_id: str | None, *, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        if run_id is None or not self.enabled:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED; got {status!r}")
        self._submit("end_run", {"run_id": run_id, "status": status, "end_time": _now_ms()})

    def end_abandoned_runs(self, *, tags: dict[str, str], status: str = "KILLED") -> list[str]:
        """End every RUNNING run of the experiment carrying ``tags``, and their RUNNING child runs, as ``status``.

        For runs whose process died without ending them (a SIGKILL). Returns the ids ended; [] when
        tracking is disabled or MLflow cannot be asked (one warning line; nothing is journaled).
        """
        if not self.enabled:
            return []
        if status not in ("FAILED", "KILLED"):
            raise ValueError(f"status must be FAILED or KILLED; got {status!r}")
        try:
            parents = self._ops.search_runs(clean_tags(tags, redactor()), running_only=True)
            children = [c for p in parents for c in self._ops.search_runs({MLFLOW_PARENT_RUN_ID: p},
                                                                           running_only=True)]
            for run_id in [*children, *parents]:
                self._ops.apply("end_run", {"run_id": run_id, "status": status, "end_time": _now_ms()})
        except Exception as err:  # noqa: BLE001 - bookkeeping of a dead run must not stop this one
            self._warn_once(f"could not end the MLflow runs of a dead run ({one_line(err)}); they stay RUNNING")
            return []
        return [*children, *parents]

    def run_link(self, run_id: str | None) -> str:
        """Where to see a run: its page on a server; for a local store, the command that serves it and the page."""
        if not self.enabled or run_id is None:
            return "MLflow tracking disabled"
        real = self._ops.resolve_quiet(run_id)
        if real is None:
            return (f"MLflow run pending: MLflow at {redact(self.tracking_uri)} was unreachable; "
                    f"the run is journaled to {self.journal_path} and created when it returns")
        experiment = self._ops.experiment_id_quiet()
        if experiment is None:
            return f"{redact(self.tracking_uri)} (experiment {self.experiment!r}, run {real})"
        return self._with_ui_command(run_url(self.ui_url, experiment_id=experiment, run_id=real))

    def experiment_link(self) -> str | None:
        """The experiment's runs table in the model-training view (None when MLflow cannot say its id)."""
        experiment = self._ops.experiment_id_quiet() if self.enabled else None
        return None if experiment is None else experiment_url(self.ui_url, experiment_id=experiment)

    def view_link(self, view_id: str) -> str | None:
        """The runs table with the saved view ``view_id`` applied (None when MLflow cannot say the experiment)."""
        experiment = self._ops.experiment_id_quiet() if self.enabled else None
        return None if experiment is None else view_url(self.ui_url, experiment_id=experiment, view_id=view_id)

    def charts_link(self, view_id: str) -> str | None:
        """The saved view ``view_id`` as MLflow's charts: metrics against steps, one line per run."""
        experiment = self._ops.experiment_id_quiet() if self.enabled else None
        return None if experiment is None else charts_url(self.ui_url, experiment_id=experiment, view_id=view_id)

    def compare_link(self, run_ids: Sequence[str | None]) -> str | None:
        """MLflow's Compare page for these runs (None unless every run exists in MLflow)."""
        experiment = self._ops.experiment_id_quiet() if self.enabled else None
        real = [self._ops.resolve_quiet(r) for r in run_ids if r is not None]
        if experiment is None or not real or None in real:
            return None
        return compare_url(self.ui_url, experiment_id=experiment, run_ids=[r for r in real if r is not None])

    def artifact_url(self, run_id: str | None, path: str) -> str | None:
        """The URL of a run's artifact on MLflow's server (``/get-artifact``; an <img> can show it).

        For a local store, where ``mlflow ui`` serves it once started (``is_server`` is False then). None
        with tracking disabled or while the run is still journaled.
        """
        if not self.enabled or run_id is None:
            return None
        real = self._ops.resolve_quiet(run_id)
        return None if real is None else artifact_url(self.ui_url, run_id=real, path=path)

    def ui_command(self) -> str | None:
        """For a local store: the command that serves MLflow's UI at ``ui_url`` (this interpreter's mlflow)."""
        local = local_store_path(self.tracking_uri)
        if local is None:
            return None
        return f"{shlex.quote(sys.executable)} -m mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"

    def _with_ui_command(self, url: str) -> str:
        command = self.ui_command()
        return url if command is None else f"{command}  then open {url}"

    def log_sampler_model(self, run_id: str | None, *, weights_path: str, manifest: dict,
                          registered_model: str | None, tags: dict[str, str] | None = None,
                          alias: str | Sequence[str] | None = None,
                          description: str | None = None, model_name: str = MODEL_NAME) -> tuple[str, str | None]:
        """Log the sampler as a models-from-code pyfunc (safetensors + manifest); register it if asked.

        Returns ``(model_uri, version)``: ``models:/<model_id>`` and the registered version (None when
        not registered). ``alias`` (one name or several) is set on that version in the same (journaled)
        call, so a version registered during an outage gets its aliases on replay; ``description`` is the
        version's description in the registry; ``model_name`` the logged model's name (MLflow's model lists
        show it; ``tasks.tracking.sampler_model.sampler_model_name``). While MLflow
        is unreachable returns ``("runs:/<run_id>/<model_name>", None)`` and the replay does it all later;
        ``("", None)`` when MLflow refused it (logged).
        """
        if run_id is None or not self.enabled:
            return "", None
        red = redactor()
        payload = {"run_id": run_id, "weights_path": str(weights_path),
                   "manifest": json.loads(red(json.dumps(manifest))),
                   "registered_model": registered_model, "tags": clean_tags(tags, red),
                   "aliases": [alias] if isinstance(alias, str) else list(alias or []),
                   "description": red(description) if description else None, "model_name": model_name}
        result = self._submit("log_sampler_model", payload, offline_result=(f"runs:/{run_id}/{model_name}", None))
        return ("", None) if result is None else (result[0], result[1])

    def reopen_run(self, run_id: str) -> str | None:
        """Continue a finished run (back to RUNNING): the run id, or None when MLflow has no such run.

        While MLflow is unreachable the call is journaled and ``run_id`` returned.
        """
        if not self.enabled:
            return None
        return self._submit("reopen_run", {"run_id": run_id}, offline_result=run_id)

    def save_runs_view(self, *, view_id: str, name: str, metrics: Sequence[str], search_filter: str = "",
                       params: Sequence[str] = ()) -> None:
        """Create or extend the saved runs-table view ``view_id`` of the experiment (the UI's "Views" menu),
        showing the columns of ``params`` then ``metrics``; columns already in the view stay."""
        if not self.enabled or not metrics:
            return
        self._submit("save_runs_view", {"view_id": view_id, "name": name,
                                        "columns": [f"params.`{p}`" for p in params] +
                                                   [metric_column(m) for m in metrics],
                                        "search_filter": search_filter, "timestamp": _now_ms()})

    def set_alias(self, *, registered_model: str, alias: str, version: str) -> None:
        """Point ``registered_model@alias`` at ``version``."""
        if not self.enabled:
            return
        self._submit("set_alias", {"registered_model": registered_model, "alias": alias, "version": str(version)})

    def warm_up(self) -> None:
        """Do MLflow's once-per-process work now (``pd run`` does it while Prefect's server starts).

        A local store gets its schema and the experiment; a remote one is left alone (no network wait
        here). MLflow's map of installed distributions, which every logged model's pip requirements are
        checked against, is built (a private MLflow helper, used only when present). Never raises: the
        real calls handle a failure their own way.
        """
        if not self.enabled:
            return
        if local_store_path(self.tracking_uri) is not None:
            self._ops.experiment_id_quiet()
        from mlflow.utils import requirements_utils

        build = getattr(requirements_utils, "_init_modules_to_packages_map", None)
        if build is not None:
            with contextlib.suppress(Exception):
                build()

    def resolve_run_id(self, run_id: str | None) -> str | None:
        """The real id for a ``pending-...`` placeholder once replayed (None while still journaled)."""
        return None if run_id is None else self._ops.resolve_quiet(run_id)

    def flush(self) -> int:
        """Replay journaled calls in order; returns how many are still pending (never raises)."""
        if not self.enabled:
            return 0
        try:
            return self._flush()
        except Exception as err:  # noqa: BLE001 - an unreadable journal must not stop training
            self._warn_once(f"MLflow journal {self.journal_path} cannot be replayed: {one_line(err)}")
            return self._journal.count()

    def _flush(self) -> int:
        with self._journal.locked():
            entries = self._journal.entries()
            if not entries:
                self._journal.replace([])  # lines it refused (if any) are moved aside
                return 0
            self._last_probe = time.monotonic()
            done = dropped = 0
            remaining: list[dict[str, Any]] = []
            for index, entry in enumerate(entries):
                try:
                    with replay_payload(entry) as payload:
                        self._ops.apply(entry["op"], payload, replaying=True)
                except Exception as err:  # noqa: BLE001 - classify, never raise into training code
                    if is_transient(err) and not isinstance(err, Unresolved):
                        remaining = entries[index:]
                        break
                    dropped += 1
                    log.warning("journaled MLflow %s dropped on replay (refused): %s", entry["op"], one_line(err))
                else:
                    done += 1
                for key in _STASHED:
                    if key in entry["payload"]:
                        self._journal.unstash(entry["payload"][key])
            self._journal.replace(remaining)
        if remaining:
            log.debug("MLflow at %s still unreachable; %d calls pending in %s",
                      redact(self.tracking_uri), len(remaining), self.journal_path)
        else:
            self._outage_warned = False
            log.info("MLflow at %s is back: replayed %d journaled calls (%d refused and dropped)",
                     redact(self.tracking_uri), done, dropped)
        return len(remaining)

    def _submit(self, op: str, payload: dict[str, Any], *, offline_result: Any = None) -> Any:
        """Run a call now, or journal it (outage / earlier calls still pending); never raises."""
        try:
            if self._journal.nonempty() and not self._replay_if_due():
                return self._journal_call(op, payload, offline_result, reason=None)
            return self._ops.apply(op, payload)
        except Exception as err:  # noqa: BLE001 - the whole point: training must go on
            if is_transient(err):
                return self._journal_call(op, payload, offline_result, reason=err)
            self._warn_once(f"MLflow {op} refused and dropped: {one_line(err)}")
            return None

    def _replay_if_due(self) -> bool:
        """Try a replay at most every ``retry_interval_s``; True when nothing is pending after it."""
        if time.monotonic() - self._last_probe < self.retry_interval_s:
            return False
        return self.flush() == 0

    def _journal_call(self, op: str, payload: dict[str, Any], offline_result: Any, *,
                      reason: BaseException | None) -> Any:
        """Append the call to the journal (stashing the files it needs); one warning per outage."""
        if reason is not None:
            self._last_probe = time.monotonic()
        try:
            with self._journal.locked():
                stored = dict(payload)
                for key in _STASHED:
                    if key in stored:
                        stored[key] = self._journal.stash(stored[key])
                self._journal.append({"op": op, "payload": stored, "journaled_at": _now_ms()})
        except Exception as err:  # noqa: BLE001 - disk full etc.: say it, still do not raise
            log.error("MLflow %s LOST: MLflow at %s unreachable and the journal %s cannot be written (%s)",
                      op, redact(self.tracking_uri), self.journal_path, one_line(err))
            return offline_result
        if not self._outage_warned:
            self._outage_warned = True
            why = f" ({one_line(reason)})" if reason is not None else ""
            log.warning("MLflow at %s unreachable%s; %d calls journaled to %s; they are replayed when it returns",
                        redact(self.tracking_uri), why, self._journal.count(), self.journal_path)
        return offline_result

    def _find_pending(self, tags: dict[str, str]) -> str | None:
        """A journaled run creation carrying ``tags``: its placeholder (latest first)."""
        for entry in reversed(self._journal.entries()):
            if entry["op"] == "start_run" and all(entry["payload"]["tags"].get(k) == v for k, v in tags.items()):
                return entry["payload"]["placeholder"]
        return None

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)
