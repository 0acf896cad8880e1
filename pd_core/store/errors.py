"""The store's errors: each message is one line naming the URI and the fix."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A storage operation failed or a checkpoint did not verify; the message names the URI and the fix."""


class StorageIOError(StoreError):
    """The storage itself failed (I/O, permissions, disk full, network); the original error is ``__cause__``.

    ``transient`` says whether retrying may help: False for this class (disk full, permission denied,
    read-only folder: a retry only repeats the failure), True for :class:`TransientStorageIOError`.
    """

    transient = False


class TransientStorageIOError(StorageIOError):
    """The storage was unreachable or timed out (connection refused/reset, timeout, throttling): worth a retry."""

    transient = True


class LeaseHeldError(StoreError):
    """Another unexpired owner holds the lease: a second writer on the same key is refused."""

    def __init__(self, message: str, *, owner: str | None = None, expires_at: str | None = None) -> None:
        super().__init__(message)
        self.owner = owner  # who holds it
        self.expires_at = expires_at  # UTC ISO time the lease runs out unless renewed


class LeaseLostError(StoreError):
    """Our lease expired and someone else took it over (or removed it) before we renewed it."""

