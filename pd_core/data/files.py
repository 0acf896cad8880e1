"""Bytes through fsspec: join and probe locations, read (gunzipping by magic bytes), write atomically.

Every location may be a local path (``~`` expanded) or any fsspec URL (``file://``, ``memory://``,
``s3://``). A write goes to a temporary sibling that is then moved into place, so no half-written
file is ever visible under the final name.
"""

from __future__ import annotations

import gzip
import os
import uuid
import zlib

import fsspec

from pd_core.data.common import DatasetError


def _local(url: str) -> str:
    return url if "://" in url else os.path.expanduser(url)


def join_url(base: str, *names: str) -> str:
    """base/name/... for local paths and fsspec URLs alike."""
    return "/".join([base.rstrip("/"), *names]) if base else "/".join(names)


def url_exists(url: str) -> bool:
    """Whether ``url`` names an existing file or directory (False when the filesystem cannot tell)."""
    try:
        fs, path = fsspec.core.url_to_fs(_local(url))
        return bool(fs.exists(path))
    except (OSError, ValueError, ImportError):
        return False


def read_bytes(url: str) -> bytes:
    """All bytes of a local path or fsspec URL; DatasetError naming it when it cannot be read."""
    try:
        with fsspec.open(_local(url), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"{url} does not exist") from None
    except (OSError, ValueError, ImportError) as exc:
        raise DatasetError(f"{url} could not be read: {exc}") from None


def _maybe_gunzip(raw: bytes, *, source: str) -> bytes:
    """Decompress gzip data (recognised by its magic bytes, not the file name)."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"{source} is a truncated or corrupt gzip file ({exc}); delete it and get it "
                           "again") from None


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then move it into place: no half-written file is visible."""
    fs, path = fsspec.core.url_to_fs(_local(url))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
