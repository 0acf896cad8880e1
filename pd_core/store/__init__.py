"""Checkpoint store over any fsspec URL: safetensors weights, a JSON manifest, atomic publish, leases.

Modules, lowest first: ``errors``; ``retry`` (transient errors, backoff); ``formats`` (keys, JSON,
safetensors payloads); ``objects`` (guarded atomic file I/O under a root URL); ``leases``;
``checkpoints`` (:class:`CheckpointStore`: checkpoints and in-round state).
"""

from pd_core.store.checkpoints import (
    CHECKPOINT_FORMAT,
    MANIFEST_NAME,
    NOT_SAVED,
    STATE_NAME,
    CheckpointRef,
    CheckpointStore,
)
from pd_core.store.errors import (
    LeaseHeldError,
    LeaseLostError,
    StorageIOError,
    StoreError,
    TransientStorageIOError,
)
from pd_core.store.formats import sha256_bytes
from pd_core.store.leases import LEASE_NAME, Lease
from pd_core.store.retry import is_transient_error, retry

__all__ = ["CHECKPOINT_FORMAT", "LEASE_NAME", "MANIFEST_NAME", "NOT_SAVED", "STATE_NAME", "CheckpointRef",
           "CheckpointStore", "Lease", "LeaseHeldError", "LeaseLostError", "StorageIOError", "StoreError",
           "TransientStorageIOError", "is_transient_error", "retry", "sha256_bytes"]
