"""Checkpoints (weights + manifest) and in-round training state, each a safetensors file behind a JSON pointer.

Layout of a checkpoint folder ``<root>/<key>/``::

    model-<sha16>.safetensors   the weights; the name carries the content hash, so a new save never
                                overwrites the file that the current manifest points to
    manifest.json               written LAST; the only thing a reader trusts (status "complete")
    state-<sha16>.safetensors   in-round resumable state (weights, optimizer, RNG), if any
    state.json                  its pointer, written last the same way
    lease.json                  who may write under this key, until when (``acquire_lease``)
    .tmp-<uuid>-<name>          files being written; never read, removed by the next save

Loading never unpickles: tensors come from ``safetensors.torch.load`` on verified bytes only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as _safetensors_save
from torch import Tensor

from pd_core.store.errors import StorageIOError, StoreError
from pd_core.store.formats import (
    check_key,
    deserialize,
    dumps_json,
    looks_like_safetensors,
    member_name,
    prepare_tensors,
    sha256_bytes,
    utc_iso,
)
from pd_core.store.leases import LeasingStore
from pd_core.store.objects import TMP_PREFIX
from pd_core.store.retry import one_line, storage_error_types

log = logging.getLogger("pd_core.store")

MANIFEST_NAME = "manifest.json"
NOT_SAVED = "not saved"  # CheckpointStore.problem: no manifest, nothing published at the key
STATE_NAME = "state.json"
CHECKPOINT_FORMAT = "pd-checkpoint/1"
STATE_FORMAT = "pd-state/1"
# Fields the store writes itself; a caller passing them would be silently overridden otherwise.
RESERVED_MANIFEST_FIELDS = frozenset({"format", "sha256", "files", "status", "created_at"})


@dataclass(frozen=True)
class CheckpointRef:
    """What a saved checkpoint is and where: passed between tasks instead of tensors."""

    uri: str  # full URL of the checkpoint folder, e.g. s3://bucket/store/pipelines/x/teacher
    sha256: str  # sha256 of the weights file (the checkpoint's identity)
    manifest: dict  # the manifest as written
    key: str = ""  # key inside the store that wrote it



class CheckpointStore(LeasingStore):
    """Checkpoints, in-round state, small files and leases under one fsspec root URL (see :class:`ObjectStore`)."""

    def __repr__(self) -> str:
        return f"CheckpointStore({self.root!r})"

    def _collect_garbage(self, folder: str, *, prefix: str, pointer: str, keep: str | None) -> None:
        """Delete this bundle's files the pointer no longer names, and leftover temp files of crashed saves.

        Assumes one writer per key (what leases are for): a concurrent writer's temp files would be
        removed, which makes its save fail verification, never publish a partial file.
        """
        data_re = re.compile(rf"({re.escape(TMP_PREFIX)}[0-9a-f]{{32}}-)?{re.escape(prefix)}-[0-9a-f]{{16}}"
                             rf"\.safetensors")
        pointer_tmp_re = re.compile(rf"{re.escape(TMP_PREFIX)}[0-9a-f]{{32}}-{re.escape(pointer)}")
        try:
            self.fs.invalidate_cache(folder)
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return
        except storage_error_types() as err:
            log.warning("could not list %s for cleanup: %s", self._url(folder), one_line(err))
            return
        for name in names:
            if name != keep and (data_re.fullmatch(name) or pointer_tmp_re.fullmatch(name)):
                self._remove_quietly(f"{folder}/{name}")

    def _publish(self, key: str, *, prefix: str, pointer: str, payload: bytes,
                 build_doc: Callable[[dict[str, Any]], dict[str, Any]], allow_nan: bool) -> dict[str, Any]:
        """Data file under a temp name -> verify -> final name -> pointer JSON last -> cleanup."""
        folder = self._path(check_key(key))
        sha = sha256_bytes(payload)
        name = f"{prefix}-{sha[:16]}.safetensors"  # content-addressed: never overwrites what a manifest names
        doc = build_doc({"path": name, "sha256": sha, "size": len(payload)})
        pointer_bytes = dumps_json(doc, what=pointer, allow_nan=allow_nan)  # fail before writing anything
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
        name = member_name(entry.get("path"), uri=uri)
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
        folder, uri = self._path(check_key(key)), self.uri(key)
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
            return deserialize(data, uri=uri, name=name, device=device), doc
        raise AssertionError("unreachable")

    def _remove_bundle(self, key: str, *, prefix: str, pointer: str) -> None:
        """Unpublish (pointer first, so no reader trusts what follows), then delete the data files."""
        folder = self._path(check_key(key))
        self._io("delete", f"{folder}/{pointer}", lambda: self.fs.rm_file(f"{folder}/{pointer}"), missing_ok=True)
        self._collect_garbage(folder, prefix=prefix, pointer=pointer, keep=None)
        if self._local:
            with contextlib.suppress(OSError):  # leave the folder when other files live in it
                os.rmdir(folder)


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
        payload = _safetensors_save(prepare_tensors(tensors), metadata={"format": "pt"})

        def build(entry: dict[str, Any]) -> dict[str, Any]:
            return {**base, "format": CHECKPOINT_FORMAT, "sha256": entry["sha256"], "files": {"weights": entry},
                    "status": "complete", "created_at": utc_iso(time.time())}

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

    def problem(self, key: str) -> str | None:
        """Why ``key`` holds no complete checkpoint: None when it does (every file verifies), ``NOT_SAVED``
        when nothing was published there, otherwise what is wrong (one line: corrupt, truncated, ...).

        An unreachable store raises StoreError (a storage failure says nothing about the checkpoint).
        """
        folder, uri = self._path(key), self.uri(key)
        try:
            doc = self.read_manifest(key)
            if doc is None:
                return NOT_SAVED
            name, sha, size = self._entry(doc, "weights", uri=uri, pointer=MANIFEST_NAME)
        except StorageIOError:
            raise
        except StoreError as err:
            return str(err).removeprefix(f"{uri}: ")
        path = f"{folder}/{name}"
        info = self._io("read", path, lambda: self.fs.info(path), missing_ok=True)
        if info is None:
            return f"{name} listed in the manifest is missing"
        if int(info.get("size", -1)) != size:
            return f"{name} has {info.get('size')} bytes, the manifest says {size} (truncated or replaced)"
        got_sha, got_size, head = self._hash_file(path)
        if (got_sha, got_size) != (sha, size):
            return f"{name} is corrupt (sha256 {got_sha[:12]}..., the manifest says {sha[:12]}...)"
        # The header check makes a forged entry (a pickle with a matching hash) incomplete too.
        if not looks_like_safetensors(head, got_size):
            return f"{name} is not a safetensors file"
        return None

    def is_complete(self, key: str) -> bool:
        """True if ``key`` holds a complete checkpoint whose files verify.

        A missing, unfinished or corrupt checkpoint gives False; an unreachable store raises
        StoreError (so a pipeline never retrains a round just because the store was down).
        """
        return self.problem(key) is None

    def delete_checkpoint(self, key: str) -> None:
        """Remove the checkpoint at ``key`` (manifest first); other files under the key stay."""
        self._remove_bundle(key, prefix="model", pointer=MANIFEST_NAME)


    def save_state(self, key: str, *, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Atomically replace the resumable training state at ``key`` (weights, optimizer, RNG + JSON meta)."""
        payload = _safetensors_save(prepare_tensors(tensors), metadata={"format": "pt"})
        meta = dict(meta)

        def build(entry: dict[str, Any]) -> dict[str, Any]:
            return {"format": STATE_FORMAT, "status": "complete", "created_at": utc_iso(time.time()),
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

    def read_state_meta(self, key: str) -> dict[str, Any] | None:
        """The JSON meta of the saved state at ``key`` without reading its tensors (None when there is none)."""
        doc = self._read_json(f"{self._path(check_key(key))}/{STATE_NAME}", what=STATE_NAME)
        if doc is None:
            return None
        meta = doc.get("meta")
        return meta if isinstance(meta, dict) else {}

    def clear_state(self, key: str) -> None:
        """Delete the saved state at ``key`` (idempotent)."""
        self._remove_bundle(key, prefix="state", pointer=STATE_NAME)

