"""The outage journal: calls MLflow did not take, the files they need, and placeholder run ids.

While MLflow is unreachable a run creation hands out a placeholder id (``pending-...``); the replay
records which real run each placeholder became, so callers still holding a placeholder reach the run.
A journal belongs to one tracking URI: its file is named by :func:`journal_name` (a hash of the URI
without credentials), so calls journaled for one backend never replay into another.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from tasks.tracking.uris import local_store_path, normalise_uri

log = logging.getLogger("tasks.tracking")  # the package's one logger: callers filter records on this name

PENDING_PREFIX = "pending-"  # placeholder run ids handed out while MLflow is unreachable


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


class Journal:
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
