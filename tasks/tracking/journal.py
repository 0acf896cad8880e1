"""The outage journal: calls MLflow did not take, the files they need, and placeholder run ids.

While MLflow is unreachable a run creation hands out a placeholder id (``pending-...``); the replay
records which real run each placeholder became, so callers still holding a placeholder reach the run.
A journal belongs to one tracking URI: its file is named by :func:`journal_name` (a hash of the URI
without credentials), so calls journaled for one backend never replay into another.

Only what this project journaled is replayed. Every line carries a unique ``id`` and
``mac = HMAC-SHA256(secret, journal file name || canonical JSON of the line without its mac)``, the
secret kept outside the store (:func:`journal_secret`: ``$PD_JOURNAL_SECRET``, else a random key in
``$XDG_CONFIG_HOME/pd/journal-secret``, mode 0600); the placeholder map is signed the same way. A
line without a valid mac, a repeated id, or a file path outside the journal's own stash folder is
refused: never replayed, moved to ``<journal>.refused``, one warning line naming the journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pd_core.config.secrets import strip_credentials
from tasks.tracking.redact import redact, redacted_copy
from tasks.tracking.uris import local_store_path, normalise_uri

log = logging.getLogger("tasks.tracking")  # the package's one logger: callers filter records on this name

PENDING_PREFIX = "pending-"  # placeholder run ids handed out while MLflow is unreachable
SECRET_ENV = "PD_JOURNAL_SECRET"  # noqa: S105 - a variable name (one the redactor treats as secret)
STASHED_KEYS = ("local_path", "weights_path")  # payload keys naming files the journal keeps its own copy of


def _secret_file() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "pd" / "journal-secret"


def journal_secret() -> bytes:
    """The key journal lines are signed with, never in the store: ``$PD_JOURNAL_SECRET`` (set it to one value on
    every machine that shares a store), else ``$XDG_CONFIG_HOME/pd/journal-secret``, created (0600) on first use."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].encode("utf-8")
    path = _secret_file()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32).hex().encode("ascii"))
    try:
        os.link(tmp, path)  # atomic and never over another process's key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def _mac(doc: dict[str, Any], *, name: str) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(journal_secret(), f"{name}\n{body}".encode(), hashlib.sha256).hexdigest()


def journal_name(uri: str) -> str:
    """``mlflow-journal-<16 hex>.jsonl``: the journal file of one tracking URI (credentials stripped first, so a
    rotated token keeps its journal, and none is ever part of a file name)."""
    digest = hashlib.sha256(strip_credentials(normalise_uri(uri)).encode("utf-8")).hexdigest()[:16]
    return f"mlflow-journal-{digest}.jsonl"


def default_journal_path(uri: str) -> Path:
    """Next to a local store; in the temp dir for remote servers; one file per URI either way."""
    path = local_store_path(uri)
    folder = path.parent if path is not None else Path(tempfile.gettempdir())
    return folder / journal_name(uri)


@contextlib.contextmanager
def replay_payload(entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A journaled call's payload redacted again as on its first send (files as a redacted copy, text redacted)."""
    payload = dict(entry["payload"])
    if "text" in payload and isinstance(payload["text"], str):
        payload["text"] = redact(payload["text"])
    with tempfile.TemporaryDirectory(prefix="pd-redacted-") as tmp:
        if entry.get("op") == "log_artifact" and "local_path" in payload:
            payload["local_path"] = str(redacted_copy(Path(payload["local_path"]), Path(tmp)))
        yield payload


class Journal:
    """Append-only JSONL of calls MLflow did not take, plus stashed files and placeholder -> run id map.

    Guarded by a thread lock and an fcntl lock on ``<path>.lock``, so several Trackers (threads or
    processes) sharing one journal never interleave a replay with an append.
    """

    def __init__(self, path: Path):
        self.path = path
        self.files_dir = path.with_name(path.name + ".files")
        self.ids_path = path.with_name(path.name + ".ids.json")
        self.refused_path = path.with_name(path.name + ".refused")
        self._lock = threading.RLock()
        self._refused: list[str] = []  # raw lines of the last read that this project did not write
        self._warned: set[str] = set()

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
        """The journaled calls this project wrote (valid mac, unique id, stashed files in the stash folder)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out, seen, refused = [], set(), []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a killed process: nothing to replay
                log.warning("MLflow journal %s line %d is not JSON: skipped", self.path, number)
                continue
            if self._genuine(entry) and entry["id"] not in seen:
                seen.add(entry["id"])
                out.append(entry)
            else:
                refused.append(line)
        self._refused = refused
        if refused and not set(refused) <= self._warned:
            self._warned.update(refused)
            log.warning("MLflow journal %s: %d line(s) not written by this project (no valid signature) refused, "
                        "never replayed; moved to %s", self.path, len(refused), self.refused_path)
        return out

    def _genuine(self, entry: Any) -> bool:
        if not (isinstance(entry, dict) and isinstance(entry.get("mac"), str) and isinstance(entry.get("id"), str)
                and isinstance(entry.get("payload"), dict)):
            return False
        if not hmac.compare_digest(entry["mac"], _mac(entry, name=self.path.name)):
            return False
        stash = os.path.realpath(self.files_dir)
        return all(os.path.commonpath([stash, os.path.realpath(str(entry["payload"][key]))]) == stash
                   for key in STASHED_KEYS if key in entry["payload"])

    def _signed(self, entry: dict[str, Any]) -> dict[str, Any]:
        doc = {k: v for k, v in entry.items() if k != "mac"}
        doc.setdefault("id", uuid.uuid4().hex)
        return {**doc, "mac": _mac(doc, name=self.path.name)}

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(self._signed(entry)) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the journal is what stands between an outage and a lost round

    def replace(self, entries: list[dict[str, Any]]) -> None:
        """Atomically rewrite the journal with what is still pending (refused lines go to ``refused_path``)."""
        if self._refused:
            with open(self.refused_path, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in self._refused))
            self._refused = []
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + f".tmp-{uuid.uuid4().hex}")
        tmp.write_text("".join(json.dumps(self._signed(e)) + "\n" for e in entries), encoding="utf-8")
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
        """Placeholder -> real run id, when the map is signed (an unsigned or altered map maps nothing)."""
        try:
            doc = json.loads(self.ids_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        if (isinstance(doc, dict) and isinstance(doc.get("ids"), dict) and isinstance(doc.get("mac"), str)
                and hmac.compare_digest(doc["mac"], _mac(doc, name=self.ids_path.name))):
            return doc["ids"]
        if str(self.ids_path) not in self._warned:
            self._warned.add(str(self.ids_path))
            log.warning("MLflow journal %s: its run-id map %s is not signed by this project: ignored",
                        self.path, self.ids_path)
        return {}

    def add_id(self, placeholder: str, run_id: str) -> None:
        doc = {"ids": {**self.ids(), placeholder: run_id}}
        tmp = self.ids_path.with_name(self.ids_path.name + f".tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({**doc, "mac": _mac(doc, name=self.ids_path.name)}), encoding="utf-8")
        os.replace(tmp, self.ids_path)
