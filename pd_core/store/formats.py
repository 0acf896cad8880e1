"""Store keys, JSON pointer documents and safetensors payloads: pure checks and conversions, no I/O."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from torch import Tensor

from pd_core.store.errors import StoreError

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9_=+@-][A-Za-z0-9._=+@-]*")  # no leading "." (reserved for temp files)
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.safetensors")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def utc_iso(ts: float) -> str:
    """``2025-01-31T12:00:00Z`` for a unix time."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_key(key: str, *, allow_empty: bool = True) -> str:
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


def member_name(name: Any, *, uri: str) -> str:
    """A manifest's file entry must be a plain file name inside the checkpoint folder."""
    if not isinstance(name, str) or not _MEMBER_NAME.fullmatch(name):
        raise StoreError(f"{uri}: manifest file path {name!r} points outside the checkpoint folder or is not a "
                         f".safetensors file name; refusing to load it (the manifest was edited or tampered "
                         f"with: delete this checkpoint and recreate it)")
    return name


def dumps_json(doc: Mapping[str, Any], *, what: str, allow_nan: bool) -> bytes:
    """JSON bytes (key order kept: the optimizer structure must come back in order), with a clear error."""
    try:
        return json.dumps(doc, indent=2, allow_nan=allow_nan).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serializable (str/int/float/bool/None/lists/dicts): {err}") from err


def prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Cheap header check on a file's first bytes: 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9 or size < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def deserialize(data: bytes, *, uri: str, name: str, device: str | torch.device) -> dict[str, Tensor]:
    """safetensors bytes -> tensors; anything else (a pickle, a torch.save zip) is refused, never executed."""
    problem = None
    if not looks_like_safetensors(data[:16], len(data)):
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

