"""MLflow tracking for the pipeline: runs, params, metrics, artifacts, the sampler model, and a journal.

Design choices (design section 4, issues 5 and 9):

- Only :class:`mlflow.MlflowClient` with explicit run ids: tasks may run in threads, and MLflow's
  fluent API keeps a global active run and a global tracking URI.
- Nothing sent to MLflow is trusted to be clean: params, tags, metric names, run names and text
  artifacts go through :func:`redact`, which replaces the values of secret-looking environment
  variables (and URL passwords) with ``***``.
- A tracking outage never raises into training code. A call that fails because MLflow is unreachable
  is appended to a JSONL journal; one warning line per outage says where; :meth:`Tracker.flush`
  replays the journal in order (run creations map their placeholder ids to the real ones). Calls that
  MLflow refuses for good (bad input) are logged as one warning line and dropped.
- The sampler is logged as an MLflow 3 "models from code" pyfunc (``tasks/mlflow_model.py``) with the
  weights as a safetensors artifact and the manifest as JSON: no pickle anywhere, and
  :func:`load_sampler_from_mlflow` gives pd_core a weights file and a manifest to load without
  executing any logged code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS, MLFLOW_PARENT_RUN_ID

if TYPE_CHECKING:
    import pandas

log = logging.getLogger(__name__)

MODEL_NAME = "sampler"  # name of the logged model: runs:/<run_id>/sampler resolves to it
MODEL_CODE_PATH = Path(__file__).with_name("mlflow_model.py")  # the models-from-code file
PENDING_PREFIX = "pending-"  # placeholder run ids handed out while MLflow is unreachable

# MLflow's own limits (mlflow/utils/validation.py); longer values are truncated with a note.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Environment variable names whose values are secrets (matched anywhere in the name).
_SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# Values too generic to redact even when a secret-looking variable holds them (flags, not secrets).
_NOT_SECRET_VALUES = frozenset({"true", "false", "none", "null", "0000"})
# Param/tag names whose value is a secret whatever the environment says (defence in depth).
_SECRET_KEY = re.compile(r"(^|[._-])(key|secret|password|passwd|token|api_?key|access_key(_id)?|"
                         r"secret_access_key|session_token|private_key|credentials?)$", re.I)
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@/\s]+)@")
# Short HTTP retries: MLflow's defaults (7 retries, backoff 2, 120 s timeout) stall an outage for minutes;
# the journal makes retrying here pointless. Set only where the user has not set them.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
_OFFLINE_HYGIENE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
_TEXT_SUFFIXES = frozenset({".txt", ".md", ".json", ".yaml", ".yml", ".csv", ".log", ".html", ".toml", ".cfg", ".ini"})
_PIP_REQUIREMENTS = ("torch", "safetensors", "numpy")


class TrackingError(RuntimeError):
    """A model could not be loaded from MLflow (one-line message naming the URI)."""


class _Unresolved(Exception):
    """A placeholder run id whose run creation is still in the journal."""


# ----------------------------------------------------------------------------------------------
# Params and secrets


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    """Nested dict (or pydantic model) -> ``{"a.b.c": value}``; lists stay values; empty dicts stay ``{}``.

    The resolved config is flattened this way for every run, so parent and child runs of every
    pipeline carry the same param names and line up in MLflow's compare view.
    """
    if hasattr(d, "model_dump"):
        d = d.model_dump(mode="json")
    out: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = value
    return out


def _secret_values() -> list[str]:
    """Secret env values in the forms they may appear in (raw, URL-quoted), longest first."""
    values = {v for k, v in os.environ.items()
              if _SECRET_ENV_NAME.search(k) and len(v) >= 4 and v.lower() not in _NOT_SECRET_VALUES}
    forms = set(values)
    for v in values:
        forms |= {quote(v, safe=""), quote(v, safe="/:"), quote(v, safe="/"), json.dumps(v)[1:-1]}
    # Longest first, so a secret that contains another secret is replaced whole.
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


def _redactor() -> Callable[[str], str]:
    """A redact function with the secrets read once (for batches of values)."""
    secrets = _secret_values()

    def apply(text: str) -> str:
        if not isinstance(text, str):
            text = str(text)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return _URL_PASSWORD.sub(r"\g<head>:***@", text)

    return apply


def redact(text: str) -> str:
    """Replace values of secret-looking environment variables (len >= 4) and URL passwords with ``***``.

    Secret-looking: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD
    and any name containing SECRET, TOKEN, PASSWORD, PASSWD, API_KEY, ACCESS_KEY, PRIVATE_KEY or CREDENTIAL.
    """
    return _redactor()(text)


def _clean_key(key: object, red: Callable[[str], str]) -> str:
    """A redacted name MLflow still accepts (names may not contain ``*``)."""
    return red(str(key)).replace("***", "REDACTED")


def _truncate(value: str, limit: int, *, what: str) -> str:
    """Cut a value to MLflow's limit, saying so in the value and in one log line."""
    if len(value) <= limit:
        return value
    note = f"...[truncated {len(value) - limit} chars]"
    log.info("%s is %d chars, longer than MLflow's limit %d: truncated", what, len(value), limit)
    return value[: limit - len(note)] + note


def _clean_params(params: Mapping[str, object], red: Callable[[str], str]) -> dict[str, str]:
    """Flattened, str()-ed, redacted, truncated param values; secret-named keys get ``***``."""
    out: dict[str, str] = {}
    for key, value in flatten_params(params).items():
        name = _clean_key(key, red)
        text = "***" if _SECRET_KEY.search(key) and value not in (None, "") else red(str(value))
        out[name] = _truncate(text, MAX_PARAM_VALUE, what=f"param {name}")
    return out


def _clean_tags(tags: Mapping[str, object] | None, red: Callable[[str], str]) -> dict[str, str]:
    """Redacted, truncated tag values; secret-named keys get ``***``."""
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        name = _clean_key(key, red)
        text = "***" if _SECRET_KEY.search(str(key)) and value not in (None, "") else red(str(value))
        out[name] = _truncate(text, MAX_TAG_VALUE, what=f"tag {name}")
    return out


# ----------------------------------------------------------------------------------------------
# Errors


def _one_line(err: BaseException) -> str:
    """First line of an exception message, redacted, for log lines."""
    text = str(err).strip().splitlines()
    return redact(f"{type(err).__name__}: {text[0] if text else ''}")[:300]


def _is_transient(err: BaseException) -> bool:
    """True when MLflow (or its database) was unreachable, i.e. the same call may work later."""
    import requests  # mlflow depends on it; imported here to keep module import light

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _Unresolved):
            return True
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          ConnectionError, TimeoutError)):
            return True
        if isinstance(e, MlflowException):
            # rest_utils wraps every connection/retry failure as "API request to <url> failed with ..."
            if e.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or e.message.startswith("API request to"):
                return True
        if type(e).__module__.startswith("sqlalchemy") and type(e).__name__ in ("OperationalError", "TimeoutError"):
            return True
        e = e.__cause__ or e.__context__
    return False


# ----------------------------------------------------------------------------------------------
# URIs


def _scheme(uri: str) -> str:
    return urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith(("sqlite:", "file:")) else ""


def _local_store_path(uri: str) -> Path | None:
    """The local file behind a sqlite:/// or file: tracking URI (or a plain path), else None."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        raw = unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else ""
        return None if raw in ("", ":memory:") else Path(raw).expanduser().absolute()
    if scheme == "file":
        return Path(unquote(urlsplit(uri).path)).expanduser().absolute()
    if scheme == "" and uri:
        return Path(uri).expanduser().absolute()
    return None


def _normalise_uri(uri: str) -> str:
    """Absolute sqlite/file URIs, so links and `mlflow ui` commands work from any directory."""
    path = _local_store_path(uri)
    if path is None:
        return uri.rstrip("/") if _scheme(uri) in ("http", "https") else uri
    if _scheme(uri) == "sqlite":
        return f"sqlite:///{path.as_posix()}"  # absolute path -> sqlite:////abs/...
    return path.as_uri()


def _default_artifact_location(uri: str) -> str | None:
    """``mlartifacts`` next to a sqlite file / file store, as file:// URI; None for servers."""
    path = _local_store_path(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


def _default_journal_path(uri: str) -> Path:
    """Next to a local store; in the temp dir (one file per server URI) for remote servers."""
    path = _local_store_path(uri)
    if path is not None:
        return path.parent / "mlflow-journal.jsonl"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"pd-mlflow-journal-{digest}.jsonl"


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Journal


class _Journal:
    """Append-only JSONL of calls MLflow did not take, plus stashed files and placeholder -> run id map.

    Guarded by a thread lock and an fcntl lock on ``<path>.lock``, so several Trackers (threads or
    processes) sharing one journal never interleave a replay with an append.
    """

    def __init__(self, path: Path):
        self.path = path
        self.files_dir = path.with_name(path.name + ".files")
        self.ids_path = path.with_name(path.name + ".ids.json")
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
                try:
                    import fcntl
                except ImportError:  # not POSIX: the thread lock is all we have
                    yield
                    return
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def nonempty(self) -> bool:
        """Anything pending? A stat, cheap enough to run before every call."""
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def count(self) -> int:
        """Number of journaled calls."""
        return len(self.entries()) if self.nonempty() else 0

    def entries(self) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed process: nothing to replay
                log.warning("MLflow journal %s line %d is not JSON: skipped", self.path, number)
        return out

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the journal is what stands between an outage and a lost round

    def replace(self, entries: list[dict[str, Any]]) -> None:
        """Atomically rewrite the journal with what is still pending."""
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + f".tmp-{uuid.uuid4().hex}")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        os.replace(tmp, self.path)

    def stash(self, src: str | Path) -> str:
        """Copy a file/folder the journaled call needs (training may delete the original)."""
        src = Path(src)
        dst = self.files_dir / uuid.uuid4().hex / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return str(dst)

    def unstash(self, path: str) -> None:
        p = Path(path)
        if self.files_dir in p.parents:
            shutil.rmtree(p.parent, ignore_errors=True)

    def ids(self) -> dict[str, str]:
        try:
            return json.loads(self.ids_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def add_id(self, placeholder: str, run_id: str) -> None:
        ids = {**self.ids(), placeholder: run_id}
        tmp = self.ids_path.with_name(self.ids_path.name + f".tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(ids), encoding="utf-8")
        os.replace(tmp, self.ids_path)


# ----------------------------------------------------------------------------------------------
# Tracker


class Tracker:
    """MLflow tracking for one experiment through ``MlflowClient`` with explicit run ids.

    Never raises into training code: unreachable-server failures are journaled to ``journal_path``
    and replayed by :meth:`flush` (also tried automatically, at most every ``retry_interval_s``
    seconds, before the next call); refused calls are logged and dropped. While MLflow is
    unreachable :meth:`start_run` returns a placeholder id (``pending-...``) that every other method
    accepts and that the replay maps to the real run id.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, enabled: bool = True,
                 artifact_location: str | None = None, journal_path: str | None = None,
                 retry_interval_s: float = 30.0):
        self.enabled = enabled
        self.tracking_uri = _normalise_uri(tracking_uri)
        self.experiment = experiment
        self.artifact_location = artifact_location or _default_artifact_location(self.tracking_uri)
        self.retry_interval_s = retry_interval_s
        self._journal = _Journal(Path(journal_path) if journal_path else _default_journal_path(self.tracking_uri))
        self._client_obj: MlflowClient | None = None
        self._experiment_id_cache: str | None = None
        self._ids: dict[str, str] = {}  # placeholder -> real run id, for callers still holding placeholders
        self._lock = threading.Lock()
        self._last_probe = -math.inf
        self._outage_warned = False
        self._warned: set[str] = set()
        if not enabled:
            return
        for name, value in {**_HTTP_DEFAULTS, **_OFFLINE_HYGIENE}.items():
            os.environ.setdefault(name, value)
        local = _local_store_path(self.tracking_uri)
        if local is not None:
            # sqlite refuses a file in a missing folder; a file store wants its parent.
            local.parent.mkdir(parents=True, exist_ok=True)

    # -- public API ----------------------------------------------------------------------------

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
        red = _redactor()
        payload = {"placeholder": PENDING_PREFIX + uuid.uuid4().hex, "run_name": red(run_name),
                   "parent_run_id": parent_run_id, "params": _clean_params(params or {}, red),
                   "tags": _clean_tags(tags, red), "start_time": _now_ms()}
        return self._submit("start_run", payload, offline_result=payload["placeholder"])

    def find_run(self, *, tags: dict[str, str]) -> str | None:
        """Most recent active run of the experiment carrying all ``tags`` (e.g. a round's child run)."""
        if not self.enabled:
            return None
        wanted = _clean_tags(tags, _redactor())
        if self._journal.nonempty() and not self._replay_if_due():
            return self._find_pending(wanted)
        try:
            return self._search_run(wanted)
        except Exception as err:  # noqa: BLE001 - never raise into training code
            self._warn_once(f"find_run failed: {_one_line(err)}")
            return self._find_pending(wanted)

    def log_params(self, run_id: str | None, params: dict[str, object]) -> None:
        """Log params (nested dicts flattened, values str()-ed, redacted, long values truncated)."""
        if run_id is None or not self.enabled or not params:
            return
        self._submit("log_params", {"run_id": run_id, "params": _clean_params(params, _redactor())})

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], *, step: int | None = None) -> None:
        """Log metrics at ``step`` (0 when None), timestamped now (replays keep the timestamp)."""
        if run_id is None or not self.enabled or not metrics:
            return
        red = _redactor()
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[_clean_key(key, red)] = float(value)
            except (TypeError, ValueError):
                self._warn_once(f"metric {key!r} is not a number ({type(value).__name__}): not logged")
        if values:
            self._submit("log_metrics", {"run_id": run_id, "metrics": values, "step": int(step or 0),
                                         "timestamp": _now_ms()})

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        """Set tags (redacted, truncated)."""
        if run_id is None or not self.enabled or not tags:
            return
        self._submit("set_tags", {"run_id": run_id, "tags": _clean_tags(tags, _redactor())})

    def log_artifact(self, run_id: str | None, local_path: str, *, artifact_path: str | None = None) -> None:
        """Upload a file or folder; text files are redacted first (a copy is uploaded, not the original)."""
        if run_id is None or not self.enabled:
            return
        with tempfile.TemporaryDirectory(prefix="pd-redacted-") as tmp:
            try:
                source = _redacted_copy(Path(local_path), Path(tmp))
            except OSError as err:
                self._warn_once(f"artifact {local_path} cannot be read: {_one_line(err)}")
                return
            self._submit("log_artifact", {"run_id": run_id, "local_path": str(source), "artifact_path": artifact_path})

    def log_table(self, run_id: str | None, df: "pandas.DataFrame", *, artifact_file: str) -> None:
        """Log a table as CSV at ``artifact_file`` and as mlflow.log_table JSON next to it (.json)."""
        if run_id is None or not self.enabled:
            return
        red = _redactor()
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

    def run_link(self, run_id: str | None) -> str:
        """Where to see a run: a UI URL for http(s) servers, the `mlflow ui` command for local stores."""
        if not self.enabled or run_id is None:
            return "MLflow tracking disabled"
        real = self._resolve_quiet(run_id)
        if real is None:
            return (f"MLflow run pending: MLflow at {redact(self.tracking_uri)} was unreachable; "
                    f"the run is journaled to {self.journal_path} and created when it returns")
        experiment = self._experiment_id_quiet()
        if _scheme(self.tracking_uri) in ("http", "https"):
            if experiment is None:
                return f"{redact(self.tracking_uri)}/#/experiments (experiment {self.experiment!r}, run {real})"
            return f"{redact(self.tracking_uri)}/#/experiments/{experiment}/runs/{real}"
        if _local_store_path(self.tracking_uri) is not None:
            return (f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}  "
                    f"(experiment {self.experiment!r} id {experiment}, run {real})")
        return f"{redact(self.tracking_uri)} experiment {experiment} run {real}"

    def log_sampler_model(self, run_id: str | None, *, weights_path: str, manifest: dict,
                          registered_model: str | None, tags: dict[str, str] | None = None,
                          alias: str | Sequence[str] | None = None) -> tuple[str, str | None]:
        """Log the sampler as a models-from-code pyfunc (safetensors + manifest); register it if asked.

        Returns ``(model_uri, version)``: ``models:/<model_id>`` and the registered version (None when
        not registered). ``alias`` (one name or several) is set on that version in the same (journaled)
        call, so a version registered during an outage gets its aliases on replay. While MLflow
        is unreachable returns ``("runs:/<run_id>/sampler", None)`` and the replay does it all later;
        ``("", None)`` when MLflow refused it (logged).
        """
        if run_id is None or not self.enabled:
            return "", None
        red = _redactor()
        payload = {"run_id": run_id, "weights_path": str(weights_path),
                   "manifest": json.loads(red(json.dumps(manifest))),
                   "registered_model": registered_model, "tags": _clean_tags(tags, red),
                   "aliases": [alias] if isinstance(alias, str) else list(alias or [])}
        result = self._submit("log_sampler_model", payload, offline_result=(f"runs:/{run_id}/{MODEL_NAME}", None))
        return ("", None) if result is None else (result[0], result[1])

    def set_alias(self, *, registered_model: str, alias: str, version: str) -> None:
        """Point ``registered_model@alias`` at ``version``."""
        if not self.enabled:
            return
        self._submit("set_alias", {"registered_model": registered_model, "alias": alias, "version": str(version)})

    def warm_up(self) -> None:
        """Do MLflow's once-per-process work now (``pd run`` does it while Prefect's server starts).

        A local store gets its schema and the experiment (1.8 s when the sqlite database is new); a
        remote one is left alone (no network wait here). MLflow's map of installed distributions,
        which every logged model's pip requirements are checked against, is built (0.5 s on the
        2-core VM; a private MLflow helper, used only when present). Never raises: the real calls
        handle a failure their own way.
        """
        if not self.enabled:
            return
        if _local_store_path(self.tracking_uri) is not None:
            self._experiment_id_quiet()
        from mlflow.utils import requirements_utils

        build = getattr(requirements_utils, "_init_modules_to_packages_map", None)
        if build is not None:
            with contextlib.suppress(Exception):
                build()

    def resolve_run_id(self, run_id: str | None) -> str | None:
        """The real id for a ``pending-...`` placeholder once replayed (None while still journaled)."""
        return None if run_id is None else self._resolve_quiet(run_id)

    def flush(self) -> int:
        """Replay journaled calls in order; returns how many are still pending (never raises)."""
        if not self.enabled:
            return 0
        try:
            return self._flush()
        except Exception as err:  # noqa: BLE001 - an unreadable journal must not stop training
            self._warn_once(f"MLflow journal {self.journal_path} cannot be replayed: {_one_line(err)}")
            return self._journal.count()

    def _flush(self) -> int:
        with self._journal.locked():
            entries = self._journal.entries()
            if not entries:
                return 0
            self._last_probe = time.monotonic()
            done = dropped = 0
            remaining: list[dict[str, Any]] = []
            for index, entry in enumerate(entries):
                try:
                    self._apply(entry["op"], entry["payload"], replaying=True)
                except Exception as err:  # noqa: BLE001 - classify, never raise into training code
                    if _is_transient(err) and not isinstance(err, _Unresolved):
                        remaining = entries[index:]
                        break
                    dropped += 1
                    log.warning("journaled MLflow %s dropped on replay (refused): %s", entry["op"], _one_line(err))
                else:
                    done += 1
                for key in ("local_path", "weights_path"):
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

    # -- submission and journaling --------------------------------------------------------------

    def _submit(self, op: str, payload: dict[str, Any], *, offline_result: Any = None) -> Any:
        """Run a call now, or journal it (outage / earlier calls still pending); never raises."""
        try:
            if self._journal.nonempty() and not self._replay_if_due():
                return self._journal_call(op, payload, offline_result, reason=None)
            return self._apply(op, payload)
        except Exception as err:  # noqa: BLE001 - the whole point: training must go on
            if _is_transient(err):
                return self._journal_call(op, payload, offline_result, reason=err)
            self._warn_once(f"MLflow {op} refused and dropped: {_one_line(err)}")
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
                for key in ("local_path", "weights_path"):
                    if key in stored:
                        stored[key] = self._journal.stash(stored[key])
                self._journal.append({"op": op, "payload": stored, "journaled_at": _now_ms()})
        except Exception as err:  # noqa: BLE001 - disk full etc.: say it, still do not raise
            log.error("MLflow %s LOST: MLflow at %s unreachable and the journal %s cannot be written (%s)",
                      op, redact(self.tracking_uri), self.journal_path, _one_line(err))
            return offline_result
        if not self._outage_warned:
            self._outage_warned = True
            why = f" ({_one_line(reason)})" if reason is not None else ""
            log.warning("MLflow at %s unreachable%s; %d calls journaled to %s; they are replayed when it returns",
                        redact(self.tracking_uri), why, self._journal.count(), self.journal_path)
        return offline_result

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    # -- MLflow calls (each op takes only its JSON payload, so a replay is the same call) ------

    def _apply(self, op: str, payload: dict[str, Any], *, replaying: bool = False) -> Any:
        handler: Callable[..., Any] = getattr(self, f"_op_{op}")
        return handler(payload, replaying=replaying)

    @property
    def _client(self) -> MlflowClient:
        if self._client_obj is None:
            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client_obj

    def _experiment_id(self) -> str:
        """Get-or-create the experiment (restoring it if deleted); cached."""
        if self._experiment_id_cache is not None:
            return self._experiment_id_cache
        with self._lock:
            client = self._client
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    exp_id = client.create_experiment(self.experiment, artifact_location=self.artifact_location)
                    log.info("MLflow experiment %r created (artifacts at %s)", self.experiment, self.artifact_location)
                except MlflowException as err:
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp_id = client.get_experiment_by_name(self.experiment).experiment_id  # lost a creation race
            else:
                exp_id = found.experiment_id
                if found.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
                    log.info("MLflow experiment %r was deleted: restored", self.experiment)
            self._experiment_id_cache = exp_id
        return exp_id

    def _experiment_id_quiet(self) -> str | None:
        try:
            return self._experiment_id()
        except Exception:  # noqa: BLE001 - only for display
            return None

    def _resolve(self, run_id: str) -> str:
        """Real run id for a placeholder (or the id itself); _Unresolved while its creation is journaled."""
        if not run_id.startswith(PENDING_PREFIX):
            return run_id
        if run_id not in self._ids:
            self._ids.update(self._journal.ids())
        if run_id not in self._ids:
            raise _Unresolved(f"run {run_id} is not created yet (journaled in {self.journal_path})")
        return self._ids[run_id]

    def _map_placeholders(self, tags: dict[str, str]) -> dict[str, str]:
        """Tag values that are placeholder run ids (e.g. a parent id tag) become the real ids."""
        return {k: (self._resolve(v) if v.startswith(PENDING_PREFIX) else v) for k, v in tags.items()}

    def _resolve_quiet(self, run_id: str) -> str | None:
        try:
            return self._resolve(run_id)
        except _Unresolved:
            return None

    def _op_start_run(self, p: dict[str, Any], *, replaying: bool) -> str:
        placeholder = p["placeholder"]
        real = self._resolve_quiet(placeholder) if replaying else None
        if real is None:  # not created by an earlier, partly failed replay
            tags = self._map_placeholders(p["tags"])
            if p["parent_run_id"]:
                tags[MLFLOW_PARENT_RUN_ID] = self._resolve(p["parent_run_id"])
            run = self._client.create_run(self._experiment_id(), start_time=p["start_time"], tags=tags,
                                          run_name=p["run_name"])
            real = run.info.run_id
            self._ids[placeholder] = real
            if replaying:
                self._journal.add_id(placeholder, real)
            log.info("MLflow run %s (%s) started%s", real, p["run_name"],
                     f" under {tags[MLFLOW_PARENT_RUN_ID]}" if p["parent_run_id"] else "")
        try:
            self._op_log_params({"run_id": real, "params": p["params"]}, replaying=replaying)
        except Exception:
            # The run exists: if this call is journaled, its replay must reuse the run, not make another.
            with contextlib.suppress(Exception):
                self._journal.add_id(placeholder, real)
            raise
        return real

    def _op_log_params(self, p: dict[str, Any], *, replaying: bool) -> None:
        run_id = self._resolve(p["run_id"])
        items = list(p["params"].items())
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = dict(items[start:start + MAX_PARAMS_TAGS_PER_BATCH])
            try:
                self._client.log_batch(run_id, params=[Param(k, v) for k, v in chunk.items()], synchronous=True)
            except MlflowException as err:
                if "Changing param values is not allowed" not in err.message:
                    raise
                self._log_new_params_only(run_id, chunk)

    def _log_new_params_only(self, run_id: str, params: dict[str, str]) -> None:
        """A resumed run re-logs its params: keep MLflow's values, log only new keys, say which differ."""
        existing = self._client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        fresh = [Param(k, v) for k, v in params.items() if k not in existing]
        if fresh:
            self._client.log_batch(run_id, params=fresh, synchronous=True)
        if changed:
            self._warn_once(f"run {run_id}: params {', '.join(changed)} differ from the values already "
                            f"logged; MLflow keeps the first values")

    def _op_log_metrics(self, p: dict[str, Any], *, replaying: bool) -> None:
        run_id = self._resolve(p["run_id"])
        metrics = [Metric(k, float(v), p["timestamp"], p["step"]) for k, v in p["metrics"].items()]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH], synchronous=True)

    def _op_set_tags(self, p: dict[str, Any], *, replaying: bool) -> None:
        run_id = self._resolve(p["run_id"])
        items = [RunTag(k, v) for k, v in self._map_placeholders(p["tags"]).items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[start:start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    def _op_log_artifact(self, p: dict[str, Any], *, replaying: bool) -> None:
        run_id = self._resolve(p["run_id"])
        if Path(p["local_path"]).is_dir():
            self._client.log_artifacts(run_id, p["local_path"], p["artifact_path"])
        else:
            self._client.log_artifact(run_id, p["local_path"], p["artifact_path"])

    def _op_log_text(self, p: dict[str, Any], *, replaying: bool) -> None:
        self._client.log_text(self._resolve(p["run_id"]), p["text"], p["artifact_file"])

    def _op_log_table(self, p: dict[str, Any], *, replaying: bool) -> None:
        run_id = self._resolve(p["run_id"])
        self._client.log_text(run_id, p["csv"], p["csv_file"])
        self._client.log_text(run_id, p["json"], p["json_file"])
        # The tag mlflow.log_table sets, so the UI lists the JSON as a table (overwrite, not append:
        # a rerun re-logs the whole table).
        current = json.loads(self._client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": p["json_file"], "type": "table"}
        if entry not in current:
            self._client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*current, entry]))

    def _op_end_run(self, p: dict[str, Any], *, replaying: bool) -> None:
        self._client.set_terminated(self._resolve(p["run_id"]), status=p["status"], end_time=p["end_time"])

    def _op_set_alias(self, p: dict[str, Any], *, replaying: bool) -> None:
        self._client.set_registered_model_alias(p["registered_model"], p["alias"], p["version"])
        log.info("MLflow model %s@%s -> version %s", p["registered_model"], p["alias"], p["version"])

    def _op_log_sampler_model(self, p: dict[str, Any], *, replaying: bool) -> tuple[str, str | None]:
        client = self._client
        run_id = self._resolve(p["run_id"])
        sha = _sha256_file(p["weights_path"])
        tags = {**p["tags"], "pd.weights_sha256": sha, "pd.format": "safetensors"}
        experiment_id = client.get_run(run_id).info.experiment_id
        model = client.create_logged_model(experiment_id=experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                           tags=tags, model_type="diffusion-sampler")
        try:
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
            with tempfile.TemporaryDirectory(prefix="pd-mlflow-model-") as tmp:
                local = _write_model_dir(Path(tmp), weights_path=p["weights_path"], manifest=p["manifest"],
                                         sha256=sha, mlflow_model=Model(
                                             artifact_path=model.artifact_location, model_uuid=model.model_id,
                                             run_id=run_id, model_id=model.model_id))
                client.log_model_artifacts(model.model_id, str(local))
            client.finalize_logged_model(model.model_id, "READY")
        except Exception:
            with contextlib.suppress(Exception):
                client.finalize_logged_model(model.model_id, "FAILED")
            raise
        uri = f"models:/{model.model_id}"
        log.info("MLflow model %s logged for run %s (weights sha256 %s)", uri, run_id, sha[:12])
        version = None
        if p["registered_model"]:
            version = self._register(p["registered_model"], model_id=model.model_id, run_id=run_id, tags=tags)
            # "alias": one name, in journals written before "aliases" existed
            for alias in p.get("aliases") or ([p["alias"]] if p.get("alias") else []):
                self._op_set_alias({"registered_model": p["registered_model"], "alias": alias,
                                    "version": version}, replaying=replaying)
        return uri, version

    def _register(self, name: str, *, model_id: str, run_id: str, tags: dict[str, str]) -> str:
        """Create the registered model if missing and a version from the logged model; its number."""
        client = self._client
        try:
            client.create_registered_model(name)
            log.info("MLflow registered model %r created", name)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # A local (sqlite/file) registry resolves a "models:/<id>" source through MLflow's GLOBAL tracking
        # URI (SqlAlchemyStore.create_model_version, a TODO there), so give it the logged model's artifact
        # location; a server resolves "models:/<id>" itself, which also links the version to the model.
        if _local_store_path(self.tracking_uri) is not None:
            source = client.get_logged_model(model_id).artifact_location
        else:
            source = f"models:/{model_id}"
        version = client.create_model_version(name=name, source=source, run_id=run_id, tags=tags, model_id=model_id)
        log.info("MLflow model %s version %s registered", name, version.version)
        return str(version.version)

    # -- lookup ---------------------------------------------------------------------------------

    def _search_run(self, tags: dict[str, str]) -> str | None:
        def quoted(value: str) -> str:
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

        clause = " and ".join(f"tags.`{k}` = {quoted(v)}" for k, v in tags.items())
        runs = self._client.search_runs([self._experiment_id()], filter_string=clause, max_results=1,
                                        order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _find_pending(self, tags: dict[str, str]) -> str | None:
        """A journaled run creation carrying ``tags``: its placeholder (latest first)."""
        for entry in reversed(self._journal.entries()):
            if entry["op"] == "start_run" and all(entry["payload"]["tags"].get(k) == v for k, v in tags.items()):
                return entry["payload"]["placeholder"]
        return None


# ----------------------------------------------------------------------------------------------
# Helpers


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sampler_signature() -> ModelSignature:
    """predict() input: optional num_images, steps, seed; param clip; output uint8 (N, H, W, C) images."""
    import numpy as np

    inputs = Schema([ColSpec("long", name, required=False) for name in ("num_images", "steps", "seed")])
    outputs = Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, -1))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("clip", "boolean", True)]))


def _sampler_example(manifest: dict) -> "pandas.DataFrame":
    """One request row (checked against the signature only; the sampler is not run at save time)."""
    import pandas as pd

    steps = manifest.get("steps")
    return pd.DataFrame([{"num_images": 4, "steps": int(steps) if isinstance(steps, int) else 1, "seed": 0}])


def _write_model_dir(tmp: Path, *, weights_path: str, manifest: dict, sha256: str, mlflow_model: Model) -> Path:
    """Save the models-from-code pyfunc under ``tmp/model``: code file + safetensors + manifest.json."""
    weights = tmp / "model.safetensors"
    shutil.copyfile(weights_path, weights)  # the artifact's file name inside the model
    manifest_file = tmp / "manifest.json"
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    local = tmp / "model"
    # python_model is a FILE PATH (models from code): MLflow copies the file, nothing is pickled.
    mlflow.pyfunc.save_model(
        path=str(local), python_model=str(MODEL_CODE_PATH),
        artifacts={"weights": str(weights), "manifest": str(manifest_file)},
        pip_requirements=[f"mlflow=={mlflow.__version__}", *_PIP_REQUIREMENTS],
        metadata={"weights_sha256": sha256, "weights_format": "safetensors"},
        signature=_sampler_signature(), input_example=_sampler_example(manifest), mlflow_model=mlflow_model)
    return local


def _redacted_copy(src: Path, tmp: Path) -> Path:
    """The path to upload: a redacted copy of text files that contain secrets, else ``src`` itself."""
    if src.is_dir():
        if not any(p.suffix.lower() in _TEXT_SUFFIXES for p in src.rglob("*") if p.is_file()):
            return src
        dst = tmp / src.name
        shutil.copytree(src, dst)
        for path in dst.rglob("*"):
            if path.is_file() and path.suffix.lower() in _TEXT_SUFFIXES:
                _redact_file(path, path)
        return dst
    if src.suffix.lower() not in _TEXT_SUFFIXES:
        return src
    dst = tmp / src.name
    return dst if _redact_file(src, dst) else src


def _redact_file(src: Path, dst: Path) -> bool:
    """Write a redacted ``src`` to ``dst`` when redaction changes it; True if written."""
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return False
    clean = redact(text)
    if clean == text and src != dst:
        return False
    dst.write_text(clean, encoding="utf-8")
    return True


def _model_location(client: MlflowClient, model_uri: str) -> str:
    """The artifact location behind a models:/ or runs:/ URI, through ``client`` only.

    MLflow's own models:/ resolution (ModelsArtifactRepository) reads the GLOBAL tracking/registry
    URI, whatever URI the caller passes; this resolves the same URIs with an explicit client.
    """
    scheme = urlsplit(model_uri).scheme
    if scheme == "models":
        path = model_uri[len("models:"):].strip("/")
        if "@" in path:  # models:/name@alias
            name, alias = path.rsplit("@", 1)
            return client.get_model_version_download_uri(name, client.get_model_version_by_alias(name, alias).version)
        if "/" in path:  # models:/name/version
            name, version = path.rsplit("/", 1)
            if version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise TrackingError(f"registered model {name!r} has no versions")
                version = str(max(int(v.version) for v in versions))
            return client.get_model_version_download_uri(name, version)
        return client.get_logged_model(path).artifact_location  # models:/<model_id>
    if scheme == "runs":  # runs:/<run_id>/<logged model name>
        run_id, _, name = model_uri[len("runs:"):].strip("/").partition("/")
        name = name or MODEL_NAME
        run = client.get_run(run_id)
        token: str | None = None
        matches = []
        while True:
            page = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                               filter_string=f"name = '{name}'", page_token=token)
            matches += [m for m in page if m.source_run_id == run_id]
            token = page.token
            if not token:
                break
        if matches:
            return max(matches, key=lambda m: m.creation_timestamp).artifact_location
        return f"{run.info.artifact_uri.rstrip('/')}/{name}"  # a model logged as plain run artifacts
    return model_uri  # already an artifact location (file://, s3://, mlflow-artifacts:/...)


def load_sampler_from_mlflow(model_uri: str, *, dst_dir: str | None = None,
                             tracking_uri: str | None = None) -> tuple[str, dict]:
    """Download a logged sampler (``models:/name@alias``, ``models:/<id>``, ``runs:/<run>/sampler``).

    Returns ``(weights_path, manifest)``: a local safetensors file and the manifest dict, so pd_core
    loads the model without executing logged code or unpickling anything. The weights' sha256 is
    checked against the one recorded at logging time. ``tracking_uri`` defaults to MLflow's own
    resolution (MLFLOW_TRACKING_URI). Raises :class:`TrackingError` with a one-line message.
    """
    import yaml

    uri = _normalise_uri(tracking_uri or mlflow.get_tracking_uri())
    dst = dst_dir or tempfile.mkdtemp(prefix="pd-mlflow-model-")
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        location = _model_location(client, model_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst, tracking_uri=uri))
    except Exception as err:  # noqa: BLE001 - one clear line for the CLI
        raise TrackingError(f"cannot download MLflow model {model_uri} from {redact(uri)}: {_one_line(err)}") from err
    mlmodel_path = local / "MLmodel"
    if not mlmodel_path.is_file():
        raise TrackingError(f"{model_uri} is not an MLflow model (no MLmodel file in {local})")
    mlmodel = yaml.safe_load(mlmodel_path.read_text(encoding="utf-8")) or {}
    artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    try:
        weights = local / artifacts["weights"]["path"]
        manifest_file = local / artifacts["manifest"]["path"]
    except (KeyError, TypeError) as err:
        raise TrackingError(f"{model_uri} is not a pd sampler model (no weights/manifest artifacts)") from err
    expected = (mlmodel.get("metadata") or {}).get("weights_sha256")
    if expected and _sha256_file(weights) != expected:
        raise TrackingError(f"{model_uri}: weights sha256 does not match the one logged ({expected[:12]}...)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    log.info("MLflow model %s downloaded to %s", model_uri, local)
    return str(weights), manifest


__all__ = ["MODEL_NAME", "Tracker", "TrackingError", "flatten_params", "load_sampler_from_mlflow", "redact"]
