"""Checkpoint store over any fsspec URL: safetensors weights, a JSON manifest, atomic publish, leases.

Layout of a checkpoint folder ``<root>/<key>/``::

    model-<sha16>.safetensors   the weights; the name carries the content hash, so a new save never
                                overwrites the file that the current manifest points to
    manifest.json               written LAST; the only thing a reader trusts (status "complete")
    state-<sha16>.safetensors   in-round resumable state (weights, optimizer, RNG), if any
    state.json                  its pointer, written last the same way
    lease.json                  who may write under this key, until when (``acquire_lease``)
    .tmp-<uuid>-<name>          files being written; never read, removed by the next save

Publishing: write the data under a unique temporary name, re-read and hash it, move (local
rename) or server-side copy it to its final name, then write the pointer JSON (local: temp file
+ fsync + rename; object stores: one PUT, which is all-or-nothing). A crash at any point leaves the
previous pointer and the files it names untouched, so the previous checkpoint stays readable.

Loading never unpickles: tensors come from ``safetensors.torch.load`` on verified bytes only.
Credentials come from the environment / fsspec config through ``storage_options``; they are never
written to a manifest or put into an error message.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import Tensor

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.json"
LEASE_NAME = "lease.json"
CHECKPOINT_FORMAT = "pd-checkpoint/1"
STATE_FORMAT = "pd-state/1"
OPTIMIZER_FORMAT = "pd-optimizer/1"
# Fields the store writes itself; a caller passing them would be silently overridden otherwise.
RESERVED_MANIFEST_FIELDS = frozenset({"format", "sha256", "files", "status", "created_at"})

_CHUNK = 8 * 2**20  # hash files in 8 MiB pieces so verifying a large checkpoint does not double its memory
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9_=+@-][A-Za-z0-9._=+@-]*")  # no leading "." (reserved for temp files)
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.safetensors")
_TMP_PREFIX = ".tmp-"
_TENSOR_REF, _TUPLE_REF, _DICT_REF = "__tensor__", "__tuple__", "__dict__"


# ----------------------------------------------------------------------------------------------
# Errors and small values


class StoreError(RuntimeError):
    """A storage operation failed or a checkpoint did not verify; the message names the URI and the fix."""


class StorageIOError(StoreError):
    """The storage itself failed (I/O, permissions, disk full, network); the original error is ``__cause__``."""


class LeaseHeldError(StoreError):
    """Another unexpired owner holds the lease: a second writer on the same key is refused."""

    def __init__(self, message: str, *, owner: str | None = None, expires_at: str | None = None) -> None:
        super().__init__(message)
        self.owner = owner  # who holds it
        self.expires_at = expires_at  # UTC ISO time the lease runs out unless renewed


class LeaseLostError(StoreError):
    """Our lease expired and someone else took it over (or removed it) before we renewed it."""


@dataclass(frozen=True)
class CheckpointRef:
    """What a saved checkpoint is and where: passed between tasks instead of tensors."""

    uri: str  # full URL of the checkpoint folder, e.g. s3://bucket/store/pipelines/x/teacher
    sha256: str  # sha256 of the weights file (the checkpoint's identity)
    manifest: dict  # the manifest as written
    key: str = ""  # key inside the store that wrote it


# ----------------------------------------------------------------------------------------------
# Retry and error classification


def _loaded_attr(module: str, name: str) -> Any:
    """``module.name`` if that module is already imported, else None.

    An exception can only be a botocore/aiohttp type if that library is loaded, so classifying
    errors never imports them (a local store stays free of the S3 stack).
    """
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _storage_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the storage failed" (wrapped into StoreError), not programming errors."""
    types: list[type[BaseException]] = [OSError]
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("botocore.exceptions", "ClientError"),
                         ("aiohttp", "ClientError")):
        cls = _loaded_attr(module, name)
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE})
_TRANSIENT_S3_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                 "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "500", "503"})


def is_transient_error(exc: BaseException) -> bool:
    """True for errors worth retrying (connection lost, timeout, throttling); False for everything else.

    Verification failures (StoreError), missing files and permission errors are never transient:
    retrying them only delays the clear error.
    """
    if isinstance(exc, StoreError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):  # builtin: refused/reset/aborted, socket timeouts
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    transient = tuple(cls for cls in (_loaded_attr("botocore.exceptions", "ConnectionError"),
                                      _loaded_attr("botocore.exceptions", "HTTPClientError"),
                                      _loaded_attr("aiohttp", "ClientConnectionError"))
                      if isinstance(cls, type))
    if transient and isinstance(exc, transient):
        return True
    client_error = _loaded_attr("botocore.exceptions", "ClientError")
    if isinstance(client_error, type) and isinstance(exc, client_error):
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        return code in _TRANSIENT_S3_CODES
    return False


def retry(fn: Callable[[], T], *, attempts: int = 3, base_delay: float = 0.5, max_delay: float = 30.0,
          is_transient: Callable[[BaseException], bool] = is_transient_error,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn()``; on a transient error wait base_delay * 2**i (capped at max_delay) and try again.

    Gives up after ``attempts`` calls and re-raises the last error; non-transient errors are
    raised at once.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified right below, re-raised unless transient
            if attempt == attempts - 1 or not is_transient(err):
                raise
            delay = min(max_delay, base_delay * 2**attempt)
            log.warning("transient storage error (%s), retry %d/%d in %.2fs", _one_line(err), attempt + 1,
                        attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # the loop either returns or raises


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (error messages must stay one line)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _hint(err: BaseException) -> str:
    """What the user should do about a storage error."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space or point storage.root at a larger volume"
    if isinstance(err, PermissionError) or code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ("this process may not access it: fix the folder's permissions, or the credentials in the "
                "environment (AWS_* variables / fsspec config) for an object store")
    if "Credential" in type(err).__name__:
        return ("no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or fsspec config) in the "
                "environment")
    if is_transient_error(err):
        return "the store is unreachable: check that it is running and the endpoint_url in storage.storage_options"
    return "check storage.root and storage.storage_options"


# ----------------------------------------------------------------------------------------------
# Pure helpers


def _holder_is_dead(lease_doc: Mapping[str, Any]) -> bool:
    """True when the lease was taken on this host by a process that no longer exists.

    A SIGKILLed worker cannot release its lease; without this, a rerun on the same machine would
    wait out the whole TTL. Leases from other hosts are only ever released by expiry.
    (A recycled pid makes a dead holder look alive: the rerun then waits for expiry, never worse.)
    """
    if lease_doc.get("host") != socket.gethostname():
        return False
    try:
        pid = int(lease_doc.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _utc_iso(ts: float) -> str:
    """``2025-01-31T12:00:00Z`` for a unix time."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_key(key: str, *, allow_empty: bool = True) -> str:
    """Return ``key`` if it is a clean relative path inside the store (no '..', no URL, no absolute path)."""
    if not isinstance(key, str):
        raise ValueError(f"store key must be a string, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise ValueError("store key must not be empty")
    segments = key.split("/")
    if any(not _KEY_SEGMENT.fullmatch(s) or s in (".", "..") for s in segments):
        raise ValueError(f"store key {key!r} must be a relative path of segments made of letters, digits and ._=+@- "
                         f"(not starting with '.'), e.g. 'pipelines/demo/rounds/03-0032'")
    return key


def _member_name(name: Any, *, uri: str) -> str:
    """A manifest's file entry must be a plain file name inside the checkpoint folder."""
    if not isinstance(name, str) or not _MEMBER_NAME.fullmatch(name):
        raise StoreError(f"{uri}: manifest file path {name!r} points outside the checkpoint folder or is not a "
                         f".safetensors file name; refusing to load it (the manifest was edited or tampered "
                         f"with: delete this checkpoint and recreate it)")
    return name


def _dumps(doc: Mapping[str, Any], *, what: str, allow_nan: bool) -> bytes:
    """JSON bytes (key order kept: the optimizer structure must come back in order), with a clear error."""
    try:
        return json.dumps(doc, indent=2, allow_nan=allow_nan).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serializable (str/int/float/bool/None/lists/dicts): {err}") from err


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses aliased tensors)."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping of name -> torch.Tensor, got {type(tensors).__name__}")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or (ptr in seen and t.numel() > 0):
            t = t.clone(memory_format=torch.contiguous_format)  # tied / sliced weights get their own copy
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """Cheap header check on a file's first bytes: 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9 or size < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _deserialize(data: bytes, *, uri: str, name: str, device: str | torch.device) -> dict[str, Tensor]:
    """safetensors bytes -> tensors; anything else (a pickle, a torch.save zip) is refused, never executed."""
    problem = None
    if not _looks_like_safetensors(data[:16], len(data)):
        problem = "no safetensors header"
    else:
        try:
            tensors = _safetensors_load(data)
        except SafetensorError as err:
            problem = " ".join(str(err).split())
    if problem is not None:
        raise StoreError(f"{uri}: {name} is not a safetensors file ({problem}); refusing to load it - checkpoints "
                         f"are never unpickled; re-export the weights with safetensors")
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


# ----------------------------------------------------------------------------------------------
# Optimizer state without pickle


def _encode_structure(value: Any, path: tuple[str, ...], tensors: dict[str, Tensor]) -> Any:
    """JSON-able copy of ``value`` with each tensor replaced by ``{"__tensor__": name}``."""
    where = "/".join(path) or "<root>"
    if isinstance(value, Tensor):
        name = where
        while name in tensors:  # keys containing "/" could collide; keep every tensor
            name += "~"
        tensors[name] = value.detach()
        return {_TENSOR_REF: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE_REF: [_encode_structure(v, (*path, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode_structure(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode_structure(v, (*path, k), tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():  # int keys (param ids) must come back as ints: keep them in a list
            if k is not None and not isinstance(k, (bool, int, float, str)):
                raise TypeError(f"optimizer state key at {where} has type {type(k).__name__}; only "
                                f"str/int/float/bool keys can be stored without pickle")
            items.append([k, _encode_structure(v, (*path, str(k)), tensors)])
        return {_DICT_REF: items}
    raise TypeError(f"optimizer state value at {where} has type {type(value).__name__}, which cannot be stored "
                    f"without pickle")


def _decode_structure(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`_encode_structure`."""
    if isinstance(value, list):
        return [_decode_structure(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR_REF}:
        name = value[_TENSOR_REF]
        if name not in tensors:
            raise ValueError(f"optimizer state refers to tensor {name!r}, which is not among the given tensors "
                             f"(pass the tensors returned by optimizer_state_to_tensors, names unchanged)")
        return tensors[name]
    if set(value) == {_TUPLE_REF}:
        return tuple(_decode_structure(v, tensors) for v in value[_TUPLE_REF])
    if set(value) == {_DICT_REF}:
        return {k: _decode_structure(v, tensors) for k, v in value[_DICT_REF]}
    return {k: _decode_structure(v, tensors) for k, v in value.items()}


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able structure.

    Tensors are named by their path, e.g. ``state/0/exp_avg``; int keys and tuples (``betas``)
    are kept exactly, so :func:`tensors_to_optimizer_state` rebuilds an equal state dict.
    """
    tensors: dict[str, Tensor] = {}
    structure = _encode_structure(dict(state_dict), (), tensors)
    return tensors, {"format": OPTIMIZER_FORMAT, "structure": structure}


def tensors_to_optimizer_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the state dict saved by :func:`optimizer_state_to_tensors` (for ``optimizer.load_state_dict``)."""
    if meta.get("format") != OPTIMIZER_FORMAT or "structure" not in meta:
        raise ValueError(f"optimizer meta must come from optimizer_state_to_tensors (format {OPTIMIZER_FORMAT!r}), "
                         f"got format {meta.get('format')!r}")
    return _decode_structure(meta["structure"], tensors)


# ----------------------------------------------------------------------------------------------
# Leases


class Lease:
    """A held lease on a store key; a context manager that releases it on exit.

    Renew it more often than ``ttl_s`` while working; an expired lease may be taken over by
    another owner, after which :meth:`renew` raises :class:`LeaseLostError`.
    """

    def __init__(self, *, store: CheckpointStore, key: str, owner: str, token: str, ttl_s: float,
                 expires_at: float) -> None:
        self.store = store
        self.key = key  # the leased key
        self.owner = owner
        self.token = token  # unique per acquisition: tells our lease from a later one by the same owner
        self.ttl_s = ttl_s
        self.expires_at = expires_at  # unix time
        self.released = False

    @property
    def uri(self) -> str:
        """URL of the lease file."""
        return self.store.uri(f"{self.key}/{LEASE_NAME}" if self.key else LEASE_NAME)

    def renew(self, *, ttl_s: float | None = None) -> None:
        """Push the expiry to now + ttl_s; LeaseLostError if the lease is no longer ours."""
        if self.released:
            raise LeaseLostError(f"{self.uri}: lease of {self.owner!r} was already released; acquire a new one")
        self.ttl_s = float(ttl_s) if ttl_s is not None else self.ttl_s
        self.expires_at = self.store._renew_lease(self)  # noqa: SLF001 - Lease is the store's companion

    def release(self) -> None:
        """Remove the lease file if it is still ours (idempotent)."""
        if not self.released:
            self.store._release_lease(self)  # noqa: SLF001
            self.released = True

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.release()
        except StoreError:
            if exc is None:  # do not hide the error that is already propagating behind a release failure
                raise
            log.warning("could not release lease %s while handling %s", self.uri, type(exc).__name__)

    def __repr__(self) -> str:
        return f"Lease({self.uri!r}, owner={self.owner!r}, expires_at={_utc_iso(self.expires_at)!r})"


# ----------------------------------------------------------------------------------------------
# The store


class CheckpointStore:
    """Checkpoints, in-round state, small files and leases under one fsspec root URL.

    ``root`` is a path or URL (``/data/store``, ``file:///data/store``, ``memory://x``,
    ``s3://bucket/prefix``); ``storage_options`` go to fsspec (e.g. ``{"client_kwargs":
    {"endpoint_url": "http://127.0.0.1:9000"}}``), credentials from the environment.
    """

    def __init__(self, root: str, *, storage_options: Mapping[str, Any] | None = None, retry_attempts: int = 3,
                 retry_base_delay: float = 0.5, lease_settle_s: float = 0.2) -> None:
        try:
            fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
        except (ImportError, ValueError, TypeError) as err:
            raise StoreError(f"cannot open storage root {root!r}: {_one_line(err)}; check storage.root (a path or "
                             f"file://, memory://, s3:// URL) and storage.storage_options") from err
        self.fs: fsspec.AbstractFileSystem = fs  # the filesystem (public for tests and advanced callers)
        self._root_path = path.rstrip("/") or path
        self._local = isinstance(fs, LocalFileSystem)  # local: rename is atomic and fsync matters
        self._retry_attempts = retry_attempts
        self._retry_base_delay = retry_base_delay
        self._lease_settle_s = lease_settle_s  # object stores: wait before reading a lease back

    # -- names ---------------------------------------------------------------------------------

    @property
    def root(self) -> str:
        """The root as a full URL (no credentials)."""
        return self.fs.unstrip_protocol(self._root_path)

    def _path(self, key: str) -> str:
        """Filesystem path of ``key``."""
        _check_key(key)
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

    # -- guarded I/O -----------------------------------------------------------------------------

    def _io(self, action: str, path: str, fn: Callable[[], T], *, missing_ok: bool = False,
            shown: str | None = None) -> T | None:
        """Run one storage call with retries; storage errors become StoreError naming the URL.

        ``shown`` is the path to name in errors when ``path`` is an internal temporary file.
        """
        try:
            return retry(fn, attempts=self._retry_attempts, base_delay=self._retry_base_delay)
        except FileNotFoundError as err:
            if missing_ok:
                return None
            raise StoreError(f"cannot {action} {self._url(shown or path)}: not found; check the key/URI, or rerun "
                             f"the step that writes it") from err
        except StoreError:
            raise
        except _storage_error_types() as err:
            raise StorageIOError(f"cannot {action} {self._url(shown or path)}: {_one_line(err)}; {_hint(err)}") from err

    def _remove_quietly(self, path: str) -> None:
        """Best-effort delete (cleanup on an error path must not replace the original error)."""
        try:
            self.fs.rm_file(path)
        except Exception as err:  # noqa: BLE001 - cleanup only
            if not isinstance(err, FileNotFoundError):
                log.warning("could not remove %s: %s", self._url(path), _one_line(err))

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
                while chunk := f.read(_CHUNK):
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
            raise StoreError(f"{self._url(path)}: {what} is not valid JSON ({_one_line(err)}); it was not written by "
                             f"this store - delete it and rerun") from err
        if not isinstance(doc, dict):
            raise StoreError(f"{self._url(path)}: {what} is not a JSON object; delete it and rerun")
        return doc

    # -- atomic publish ------------------------------------------------------------------------------

    def _write_temp_verified(self, folder: str, name: str, data: bytes) -> str:
        """Write ``data`` under a unique temporary name in ``folder``, re-read it and check its hash."""
        tmp, final = f"{folder}/{_TMP_PREFIX}{uuid.uuid4().hex}-{name}", f"{folder}/{name}"
        want = (sha256_bytes(data), len(data))
        try:
            self._io("write", tmp, lambda: self.fs.pipe_file(tmp, data), shown=final)
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
            self._io("write", final, lambda: self.fs.pipe_file(final, data))
            self.fs.invalidate_cache(final)
            return
        tmp = f"{folder}/{_TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            self._io("write", tmp, lambda: self.fs.pipe_file(tmp, data), shown=final)
            self._fsync(tmp, shown=final)
            self._io("publish", final, lambda: self.fs.mv(tmp, final))  # rename(2) replaces atomically
        except BaseException:
            self._remove_quietly(tmp)
            raise
        self._fsync(folder)

    def _collect_garbage(self, folder: str, *, prefix: str, pointer: str, keep: str | None) -> None:
        """Delete this bundle's files the pointer no longer names, and leftover temp files of crashed saves.

        Assumes one writer per key (what leases are for): a concurrent writer's temp files would be
        removed, which makes its save fail verification, never publish a partial file.
        """
        data_re = re.compile(rf"({re.escape(_TMP_PREFIX)}[0-9a-f]{{32}}-)?{re.escape(prefix)}-[0-9a-f]{{16}}"
                             rf"\.safetensors")
        pointer_tmp_re = re.compile(rf"{re.escape(_TMP_PREFIX)}[0-9a-f]{{32}}-{re.escape(pointer)}")
        try:
            self.fs.invalidate_cache(folder)
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return
        except _storage_error_types() as err:
            log.warning("could not list %s for cleanup: %s", self._url(folder), _one_line(err))
            return
        for name in names:
            if name != keep and (data_re.fullmatch(name) or pointer_tmp_re.fullmatch(name)):
                self._remove_quietly(f"{folder}/{name}")

    def _publish(self, key: str, *, prefix: str, pointer: str, payload: bytes,
                 build_doc: Callable[[dict[str, Any]], dict[str, Any]], allow_nan: bool) -> dict[str, Any]:
        """Data file under a temp name -> verify -> final name -> pointer JSON last -> cleanup."""
        folder = self._path(_check_key(key))
        sha = sha256_bytes(payload)
        name = f"{prefix}-{sha[:16]}.safetensors"  # content-addressed: never overwrites what a manifest names
        doc = build_doc({"path": name, "sha256": sha, "size": len(payload)})
        pointer_bytes = _dumps(doc, what=pointer, allow_nan=allow_nan)  # fail before writing anything
        self._ensure_folder(folder)
        tmp = self._write_temp_verified(folder, name, payload)
        self._promote(tmp, f"{folder}/{name}", size=len(payload))
        self._write_pointer(folder, pointer, pointer_bytes)
        self._collect_garbage(folder, prefix=prefix, pointer=pointer, keep=name)
        return doc

    def _entry(self, doc: Mapping[str, Any], role: str, *, uri: str, pointer: str) -> tuple[str, str, int]:
        """(name, sha256, size) of the file ``role`` of a complete pointer doc."""
        if doc.get("status") != "complete":
            raise StoreError(f"{uri}: {pointer} status is {doc.get('status')!r}, not 'complete'; the save did not "
                             f"finish - rerun the step that writes it")
        files = doc.get("files")
        entry = files.get(role) if isinstance(files, dict) else None
        if not isinstance(entry, dict):
            raise StoreError(f"{uri}: {pointer} lists no '{role}' file; it was not written by this store - delete it "
                             f"and rerun")
        name = _member_name(entry.get("path"), uri=uri)
        sha, size = entry.get("sha256"), entry.get("size")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha) or isinstance(size, bool) \
                or not isinstance(size, int) or size < 0:
            raise StoreError(f"{uri}: {pointer} has no valid sha256/size for {name}; delete it and rerun")
        return name, sha, size

    def _read_verified(self, folder: str, name: str, sha: str, size: int, *, uri: str) -> bytes:
        """Bytes of ``folder/name`` after checking size (before downloading) and sha256."""
        path = f"{folder}/{name}"
        info = self._io("read", path, lambda: self.fs.info(path), missing_ok=True)
        if info is None:
            raise StoreError(f"{uri}: {name} listed in the manifest is missing; the checkpoint is damaged - delete it "
                             f"and rerun to recreate it")
        if int(info.get("size", -1)) != size:
            raise StoreError(f"{uri}: {name} has {info.get('size')} bytes, the manifest says {size} (truncated or "
                             f"replaced); delete the checkpoint and rerun to recreate it")
        data = self._io("read", path, lambda: self.fs.cat_file(path))
        got = sha256_bytes(data)
        if len(data) != size or got != sha:
            raise StoreError(f"{uri}: {name} is corrupt (sha256 {got[:12]}..., {len(data)} bytes; the manifest says "
                             f"{sha[:12]}..., {size} bytes); delete the checkpoint and rerun to recreate it")
        return data

    def _load_bundle(self, key: str, *, pointer: str, role: str,
                     device: str | torch.device) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """Verified tensors + pointer doc, or None when there is no pointer."""
        folder, uri = self._path(_check_key(key)), self.uri(key)
        doc = self._read_json(f"{folder}/{pointer}", what=pointer)
        for attempt in range(2):
            if doc is None:
                return None
            name, sha, size = self._entry(doc, role, uri=uri, pointer=pointer)
            try:
                data = self._read_verified(folder, name, sha, size, uri=uri)
            except StoreError:
                # A save that finished between our manifest read and our file read removes the old
                # file; read the new manifest once instead of failing.
                newer = self._read_json(f"{folder}/{pointer}", what=pointer)
                if attempt == 0 and newer != doc:
                    doc = newer
                    continue
                raise
            return _deserialize(data, uri=uri, name=name, device=device), doc
        raise AssertionError("unreachable")

    def _remove_bundle(self, key: str, *, prefix: str, pointer: str) -> None:
        """Unpublish (pointer first, so no reader trusts what follows), then delete the data files."""
        folder = self._path(_check_key(key))
        self._io("delete", f"{folder}/{pointer}", lambda: self.fs.rm_file(f"{folder}/{pointer}"), missing_ok=True)
        self._collect_garbage(folder, prefix=prefix, pointer=pointer, keep=None)
        if self._local:
            with contextlib.suppress(OSError):  # leave the folder when other files live in it
                os.rmdir(folder)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, key: str, *, tensors: Mapping[str, Tensor], manifest: Mapping[str, Any]) -> CheckpointRef:
        """Publish weights + manifest at ``key`` atomically; returns where it is and its sha256.

        ``manifest`` needs ``kind`` (teacher/student/classifier/...); ``round``, ``steps``,
        ``parent_sha256`` and ``config_hash`` default to None; any other JSON fields are kept.
        The store adds ``format``, ``sha256``, ``files``, ``status`` and ``created_at``.
        """
        if not isinstance(manifest, Mapping):
            raise ValueError(f"manifest must be a dict, got {type(manifest).__name__}")
        clash = sorted(RESERVED_MANIFEST_FIELDS & set(manifest))
        if clash:
            raise ValueError(f"manifest fields {clash} are written by the store; remove them")
        if not isinstance(manifest.get("kind"), str) or not manifest.get("kind"):
            raise ValueError("manifest['kind'] must be a non-empty string such as 'teacher' or 'student'")
        base = {"round": None, "steps": None, "parent_sha256": None, "config_hash": None, **manifest}
        payload = _safetensors_save(_prepare_tensors(tensors), metadata={"format": "pt"})

        def build(entry: dict[str, Any]) -> dict[str, Any]:
            return {**base, "format": CHECKPOINT_FORMAT, "sha256": entry["sha256"], "files": {"weights": entry},
                    "status": "complete", "created_at": _utc_iso(time.time())}

        doc = self._publish(key, prefix="model", pointer=MANIFEST_NAME, payload=payload, build_doc=build,
                            allow_nan=False)
        return CheckpointRef(uri=self.uri(key), sha256=doc["sha256"], manifest=doc, key=key)

    def load_checkpoint(self, key: str, *, device: str | torch.device = "cpu",
                        expected_sha256: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, manifest) after verifying status, file size and sha256; StoreError otherwise."""
        loaded = self._load_bundle(key, pointer=MANIFEST_NAME, role="weights", device=device)
        if loaded is None:
            raise StoreError(f"{self.uri(key)}: no checkpoint here ({MANIFEST_NAME} not found); check the key/URI or "
                             f"run the step that produces it")
        tensors, manifest = loaded
        if expected_sha256 is not None and manifest.get("sha256") != expected_sha256:
            raise StoreError(f"{self.uri(key)}: sha256 {str(manifest.get('sha256'))[:12]}... is not the expected "
                             f"{expected_sha256[:12]}...; the checkpoint changed since it was referenced - rerun the "
                             f"step that produced it")
        return tensors, manifest

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest at ``key`` as stored (not verified), or None if there is none."""
        return self._read_json(f"{self._path(key)}/{MANIFEST_NAME}", what=MANIFEST_NAME)

    def is_complete(self, key: str) -> bool:
        """True if ``key`` holds a complete checkpoint whose files verify.

        A missing, unfinished or corrupt checkpoint gives False; an unreachable store raises
        StoreError (so a pipeline never retrains a round just because the store was down).
        """
        folder, uri = self._path(key), self.uri(key)
        try:
            doc = self.read_manifest(key)
            if doc is None:
                return False
            name, sha, size = self._entry(doc, "weights", uri=uri, pointer=MANIFEST_NAME)
        except StorageIOError:
            raise  # a storage failure says nothing about the checkpoint
        except StoreError:
            return False
        path = f"{folder}/{name}"
        info = self._io("read", path, lambda: self.fs.info(path), missing_ok=True)
        if info is None or int(info.get("size", -1)) != size:
            return False
        got_sha, got_size, head = self._hash_file(path)
        # The header check makes a forged entry (a pickle with a matching hash) incomplete too.
        return (got_sha, got_size) == (sha, size) and _looks_like_safetensors(head, got_size)

    def delete_checkpoint(self, key: str) -> None:
        """Remove the checkpoint at ``key`` (manifest first); other files under the key stay."""
        self._remove_bundle(key, prefix="model", pointer=MANIFEST_NAME)

    # -- in-round state ----------------------------------------------------------------------------

    def save_state(self, key: str, *, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Atomically replace the resumable training state at ``key`` (weights, optimizer, RNG + JSON meta)."""
        payload = _safetensors_save(_prepare_tensors(tensors), metadata={"format": "pt"})
        meta = dict(meta)

        def build(entry: dict[str, Any]) -> dict[str, Any]:
            return {"format": STATE_FORMAT, "status": "complete", "created_at": _utc_iso(time.time()),
                    "files": {"tensors": entry}, "meta": meta}

        # NaN/inf may occur in optimizer hyper-parameters; Python's json reads them back.
        self._publish(key, prefix="state", pointer=STATE_NAME, payload=payload, build_doc=build, allow_nan=True)

    def load_state(self, key: str, *, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict] | None:
        """(tensors, meta) of the saved state, or None when there is none; verified like a checkpoint."""
        loaded = self._load_bundle(key, pointer=STATE_NAME, role="tensors", device=device)
        if loaded is None:
            return None
        tensors, doc = loaded
        meta = doc.get("meta")
        if not isinstance(meta, dict):
            raise StoreError(f"{self.uri(key)}: {STATE_NAME} has no meta object; clear the state to restart the round")
        return tensors, meta

    def clear_state(self, key: str) -> None:
        """Delete the saved state at ``key`` (idempotent)."""
        self._remove_bundle(key, prefix="state", pointer=STATE_NAME)

    # -- small files ---------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically (temp, verify, rename/copy); returns its sha256."""
        path = self._path(_check_key(key, allow_empty=False))
        folder, name = posixpath.split(path)
        self._ensure_folder(folder)
        tmp = self._write_temp_verified(folder, name, bytes(data))
        self._promote(tmp, path, size=len(data))
        return sha256_bytes(data)

    def get_bytes(self, key: str) -> bytes:
        """Contents of the file at ``key``; StoreError if it does not exist."""
        path = self._path(_check_key(key, allow_empty=False))
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

    # -- leases --------------------------------------------------------------------------------------

    def _lease_path(self, key: str) -> str:
        return f"{self._path(key)}/{LEASE_NAME}"

    @contextlib.contextmanager
    def _lease_mutex(self, key: str) -> Iterator[None]:
        """Serialize read-check-write of a local lease (flock; works across processes on one machine)."""
        if not self._local:
            yield
            return
        import fcntl  # POSIX only; imported here so the module still imports elsewhere

        lock = f"{self._path(key)}/.lease.lock"
        self._ensure_folder(self._path(key))
        fd = self._io("lock", lock, lambda: os.open(lock, os.O_CREAT | os.O_RDWR, 0o644))
        try:
            self._io("lock", lock, lambda: fcntl.flock(fd, fcntl.LOCK_EX))
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _lease_expiry(self, doc: Mapping[str, Any], *, key: str) -> float:
        """Unix expiry time of a stored lease."""
        value = doc.get("expires_at_unix")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StoreError(f"{self.uri(key)}/{LEASE_NAME} has no valid expires_at_unix; it was not written by this "
                             f"store - make sure no run uses this key, then delete the file")
        return float(value)

    def _lease_doc(self, lease: Lease) -> dict[str, Any]:
        return {"owner": lease.owner, "host": socket.gethostname(), "pid": os.getpid(), "token": lease.token,
                "ttl_s": lease.ttl_s, "expires_at": _utc_iso(lease.expires_at), "expires_at_unix": lease.expires_at,
                "renewed_at": _utc_iso(time.time())}

    def _write_lease(self, key: str, doc: dict[str, Any]) -> None:
        """Write the lease; on object stores read it back to detect a concurrent writer."""
        folder = self._path(key)
        self._ensure_folder(folder)
        self._write_pointer(folder, LEASE_NAME, _dumps(doc, what=LEASE_NAME, allow_nan=False))
        if self._local:
            return  # the flock held by the caller already excludes other writers
        # Object stores have no portable atomic create-if-absent here, so: write, wait, read back.
        # Residual race: a writer that read the old lease before our PUT and writes after our
        # read-back also believes it won. The settle delay narrows that window; it cannot close it.
        time.sleep(self._lease_settle_s)
        back = self._read_json(self._lease_path(key), what=LEASE_NAME)
        if back is None or back.get("token") != doc["token"]:
            other = (back or {}).get("owner")
            raise LeaseHeldError(f"{self.uri(key)}: lost the race for the lease to {other!r}; another run with this "
                                 f"name started at the same moment - wait for it or use another pipeline name",
                                 owner=other, expires_at=(back or {}).get("expires_at"))

    def acquire_lease(self, key: str, *, owner: str, ttl_s: float) -> Lease:
        """Take the lease on ``key`` for ``ttl_s`` seconds; LeaseHeldError if another owner holds it unexpired.

        An expired lease is taken over; the same ``owner`` may re-acquire its own (a retried run).
        Expiry uses each host's wall clock, so keep ttl_s well above the clock skew between hosts.
        """
        _check_key(key)
        if not isinstance(owner, str) or not owner:
            raise ValueError("owner must be a non-empty string naming the run, e.g. its flow-run id")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        lease = Lease(store=self, key=key, owner=owner, token=uuid.uuid4().hex, ttl_s=float(ttl_s),
                      expires_at=time.time() + float(ttl_s))
        with self._lease_mutex(key):
            current = self._read_json(self._lease_path(key), what=LEASE_NAME)
            if current is not None and current.get("owner") != owner \
                    and self._lease_expiry(current, key=key) > time.time() and not _holder_is_dead(current):
                raise LeaseHeldError(
                    f"{self.uri(key)} is leased by {current.get('owner')!r} (host {current.get('host')}, pid "
                    f"{current.get('pid')}) until {current.get('expires_at')}; another run with this name is active - "
                    f"wait for it to finish or the lease to expire, or use another pipeline name",
                    owner=current.get("owner"), expires_at=current.get("expires_at"))
            lease.expires_at = time.time() + lease.ttl_s
            self._write_lease(key, self._lease_doc(lease))
        return lease

    def _renew_lease(self, lease: Lease) -> float:
        """Extend ``lease``; LeaseLostError if the stored lease is not ours any more."""
        with self._lease_mutex(lease.key):
            current = self._read_json(self._lease_path(lease.key), what=LEASE_NAME)
            if current is None or current.get("token") != lease.token:
                holder = (current or {}).get("owner")
                raise LeaseLostError(f"{lease.uri}: the lease of {lease.owner!r} expired and is now held by "
                                     f"{holder!r}; stop writing - another run owns this key")
            expires_at = time.time() + lease.ttl_s
            lease.expires_at = expires_at
            self._write_lease(lease.key, self._lease_doc(lease))
        return expires_at

    def _release_lease(self, lease: Lease) -> None:
        """Delete the lease file if it still carries our token."""
        path = self._lease_path(lease.key)
        with self._lease_mutex(lease.key):
            current = self._read_json(path, what=LEASE_NAME)
            # Object stores: a takeover between this read and the delete would lose the new
            # lease; that needs our lease to have expired first, i.e. a run that stopped renewing.
            if current is not None and current.get("token") == lease.token:
                self._io("release", path, lambda: self.fs.rm_file(path), missing_ok=True)


__all__ = ["CHECKPOINT_FORMAT", "CheckpointRef", "CheckpointStore", "Lease", "LeaseHeldError", "LeaseLostError",
           "StorageIOError", "StoreError", "is_transient_error", "optimizer_state_to_tensors", "retry", "sha256_bytes",
           "tensors_to_optimizer_state"]
