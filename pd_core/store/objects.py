"""Files under one fsspec root URL: guarded I/O (retries, one-line errors), atomic writes, small files.

A write goes to a unique temporary name, is re-read and hashed, then moved (local rename) or
server-side copied to its final name; a small JSON "pointer" is written last (local: temp file +
fsync + rename; object stores: one PUT, which is all-or-nothing). A crash at any point leaves the
previous pointer and the files it names untouched. Credentials come from the environment / fsspec
config through ``storage_options`` and never appear in an error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pd_core.store.errors import StorageIOError, StoreError, TransientStorageIOError
from pd_core.store.formats import check_key, sha256_bytes
from pd_core.store.retry import is_transient_error, one_line, retry, storage_error_types, storage_hint

log = logging.getLogger("pd_core.store")

T = TypeVar("T")

CHUNK = 8 * 2**20  # hash files in 8 MiB pieces so verifying a large checkpoint does not double its memory
TMP_PREFIX = ".tmp-"
# Object-store requests time out instead of hanging on an endpoint that accepts but never answers, and are
# tried once by botocore and s3fs: the store's own retry (one log line per retry) is the only retry layer.
S3_CONFIG_DEFAULTS = {"connect_timeout": 10, "read_timeout": 30, "retries": {"total_max_attempts": 1}}
S3_LIBRARY_RETRIES = 1
# An upload is a PUT whose client first waits for "100 Continue", a wait no socket timeout covers: every write
# to an asynchronous (object) store gets a deadline of connect + read timeout + its size at this slowest rate.
MIN_UPLOAD_BYTES_PER_S = 2**20


def with_s3_defaults(root: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with :data:`S3_CONFIG_DEFAULTS` under ``config_kwargs`` for s3:// roots.

    Keys the caller set (``config_kwargs.connect_timeout`` etc.) win; other protocols are left alone.
    """
    options = dict(storage_options or {})
    if not root.split("::")[-1].lower().startswith(("s3://", "s3a://")):
        return options
    given = options.get("config_kwargs") or {}
    options["config_kwargs"] = {**S3_CONFIG_DEFAULTS, **dict(given)}
    return options


class ObjectStore:
    """Guarded, atomic file operations under one root URL.

    ``root`` is a path or URL (``/data/store``, ``file:///data/store``, ``memory://x``,
    ``s3://bucket/prefix``); ``storage_options`` go to fsspec (e.g. ``{"client_kwargs":
    {"endpoint_url": "http://127.0.0.1:9000"}}``), credentials from the environment. On S3 the
    connect/read timeouts default to 10 s / 30 s (:func:`with_s3_defaults`; override them with
    ``config_kwargs`` in ``storage_options``).
    """

    def __init__(self, root: str, *, storage_options: Mapping[str, Any] | None = None, retry_attempts: int = 3,
                 retry_base_delay: float = 0.5) -> None:
        try:
            fs, path = fsspec.core.url_to_fs(root, **with_s3_defaults(root, storage_options))
        except (ImportError, ValueError, TypeError) as err:
            raise StoreError(f"cannot open storage root {root!r}: {one_line(err)}; check storage.root (a path or "
                             f"file://, memory://, s3:// URL) and storage.storage_options") from err
        self._write_deadline_base: float | None = None  # seconds; None: the filesystem has no deadline to pass
        if type(fs).__module__.split(".")[0] == "s3fs":
            fs.retries = S3_LIBRARY_RETRIES  # s3fs's silent retries would hide (and multiply) each timeout
            config = dict(fs.config_kwargs)
            self._write_deadline_base = float(config.get("connect_timeout", 10)) + float(config.get("read_timeout", 30))
        self.fs: fsspec.AbstractFileSystem = fs  # the filesystem (public for tests and advanced callers)
        self._root_path = path.rstrip("/") or path
        self._local = isinstance(fs, LocalFileSystem)  # local: rename is atomic and fsync matters
        self._retry_attempts = retry_attempts
        self._retry_base_delay = retry_base_delay

    @property
    def root(self) -> str:
        """The root as a full URL (no credentials)."""
        return self.fs.unstrip_protocol(self._root_path)

    def _path(self, key: str) -> str:
        """Filesystem path of ``key``."""
        check_key(key)
        if not key:
            return self._root_path
        return f"{self._root_path.rstrip('/')}/{key}"

    def _url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def uri(self, key: str) -> str:
        """Full URL of ``key`` (e.g. ``file:///data/store/pipelines/x/teacher``)."""
        return self._url(self._path(key))

    def __repr__(self) -> str:
        return f"CheckpointStore({self.root!r})"

    def _io(self, action: str, path: str, fn: Callable[[], T], *, missing_ok: bool = False,
            shown: str | None = None) -> T | None:
        """Run one storage call with retries; storage errors become StoreError naming the URL.

        ``shown`` is the path to name in errors when ``path`` is an internal temporary file.
        """
        try:
            return retry(fn, attempts=self._retry_attempts, base_delay=self._retry_base_delay,
                         what=f"{action} {self._url(shown or path)}")
        except FileNotFoundError as err:
            if missing_ok:
                return None
            raise StoreError(f"cannot {action} {self._url(shown or path)}: not found; check the key/URI, or rerun "
                             f"the step that writes it") from err
        except StoreError:
            raise
        except storage_error_types() as err:
            where = self._url(shown or path)
            cls = TransientStorageIOError if is_transient_error(err) else StorageIOError
            raise cls(f"cannot {action} {where}: {one_line(err)}; {storage_hint(err)}") from err

    def _pipe(self, path: str, data: bytes) -> None:
        """Write ``data`` at ``path`` in one call; on an object store within its deadline (FSTimeoutError past it)."""
        if self._write_deadline_base is None:
            self.fs.pipe_file(path, data)
        else:
            self.fs.pipe_file(path, data, timeout=self._write_deadline_base + len(data) / MIN_UPLOAD_BYTES_PER_S)

    def _remove_quietly(self, path: str) -> None:
        """Best-effort delete (cleanup on an error path must not replace the original error)."""
        try:
            self.fs.rm_file(path)
        except Exception as err:  # noqa: BLE001 - cleanup only
            if not isinstance(err, FileNotFoundError):
                log.warning("could not remove %s: %s", self._url(path), one_line(err))

    def _ensure_folder(self, folder: str) -> None:
        """Create the folder on local disks (object stores have no folders)."""
        if self._local:
            self._io("create folder", folder, lambda: self.fs.makedirs(folder, exist_ok=True))

    def _fsync(self, path: str, *, shown: str | None = None) -> None:
        """Flush a local file or folder to disk, so a power loss cannot publish an empty file."""
        if not self._local:
            return

        def sync() -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self._io("sync", path, sync, shown=shown)

    def _hash_file(self, path: str, *, shown: str | None = None) -> tuple[str, int, bytes]:
        """(sha256, size, first 16 bytes) of a stored file, streamed."""

        def read() -> tuple[str, int, bytes]:
            digest, size, head = hashlib.sha256(), 0, b""
            with self.fs.open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    head = head or chunk[:16]
                    digest.update(chunk)
                    size += len(chunk)
            return digest.hexdigest(), size, head

        return self._io("verify", path, read, shown=shown)

    def _read_json(self, path: str, *, what: str) -> dict | None:
        """Parse a stored JSON object; None if the file does not exist."""
        data = self._io("read", path, lambda: self.fs.cat_file(path), missing_ok=True)
        if data is None:
            return None
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{self._url(path)}: {what} is not valid JSON ({one_line(err)}); it was not written by "
                             f"this store - delete it and rerun") from err
        if not isinstance(doc, dict):
            raise StoreError(f"{self._url(path)}: {what} is not a JSON object; delete it and rerun")
        return doc

    def _write_temp_verified(self, folder: str, name: str, data: bytes) -> str:
        """Write ``data`` under a unique temporary name in ``folder``, re-read it and check its hash."""
        tmp, final = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}", f"{folder}/{name}"
        want = (sha256_bytes(data), len(data))
        try:
            self._io("write", tmp, lambda: self._pipe(tmp, data), shown=final)
            self._fsync(tmp, shown=final)
            got = self._hash_file(tmp, shown=final)[:2]
        except BaseException:
            self._remove_quietly(tmp)
            raise
        if got != want:  # not retried: the storage returned other bytes than we wrote
            self._remove_quietly(tmp)
            raise StoreError(f"cannot write {self._url(final)}: read-back verification failed (sha256 "
                             f"{got[0][:12]}, {got[1]} bytes; expected {want[0][:12]}, {want[1]} bytes); the storage "
                             f"corrupts data - check the disk or object store, then retry")
        return tmp

    def _promote(self, tmp: str, final: str, *, size: int) -> None:
        """Give a verified temporary file its final name (local: atomic rename; object store: server-side copy)."""
        if self._local:
            try:
                self._io("publish", final, lambda: self.fs.mv(tmp, final))  # rename(2): all or nothing
            except BaseException:
                self._remove_quietly(tmp)
                raise
            self._fsync(posixpath.dirname(final))
            return
        try:
            self._io("publish", final, lambda: self.fs.copy(tmp, final))  # one object appears whole, or not
            self.fs.invalidate_cache(final)
            info = self._io("check", final, lambda: self.fs.info(final))
            if int(info.get("size", -1)) != size:
                raise StoreError(f"cannot publish {self._url(final)}: copied object has {info.get('size')} bytes, "
                                 f"expected {size}; check the object store, then retry")
        finally:
            self._remove_quietly(tmp)

    def _write_pointer(self, folder: str, name: str, data: bytes) -> None:
        """Write the small JSON that publishes a checkpoint, atomically."""
        final = f"{folder}/{name}"
        if not self._local:
            # One PUT: an object store shows the whole object or the previous one, never a mix.
            self._io("write", final, lambda: self._pipe(final, data))
            self.fs.invalidate_cache(final)
            return
        tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            self._io("write", tmp, lambda: self.fs.pipe_file(tmp, data), shown=final)
            self._fsync(tmp, shown=final)
            self._io("publish", final, lambda: self.fs.mv(tmp, final))  # rename(2) replaces atomically
        except BaseException:
            self._remove_quietly(tmp)
            raise
        self._fsync(folder)

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically (temp, verify, rename/copy); returns its sha256."""
        path = self._path(check_key(key, allow_empty=False))
        folder, name = posixpath.split(path)
        self._ensure_folder(folder)
        tmp = self._write_temp_verified(folder, name, bytes(data))
        self._promote(tmp, path, size=len(data))
        return sha256_bytes(data)

    def get_bytes(self, key: str) -> bytes:
        """Contents of the file at ``key``; StoreError if it does not exist."""
        path = self._path(check_key(key, allow_empty=False))
        return self._io("read", path, lambda: self.fs.cat_file(path))

    def exists(self, key: str) -> bool:
        """True if a file or folder exists at ``key``."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return bool(self._io("check", path, lambda: self.fs.exists(path)))

    def list(self, prefix: str = "") -> list[str]:
        """Keys of the entries directly under ``prefix`` (sorted; internal dot-files hidden; [] if none)."""
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        entries = self._io("list", path, lambda: self.fs.ls(path, detail=False), missing_ok=True) or []
        names = {posixpath.basename(p.rstrip("/")) for p in entries if p.rstrip("/") != path.rstrip("/")}
        return sorted(f"{prefix}/{n}" if prefix else n for n in names if n and not n.startswith("."))

