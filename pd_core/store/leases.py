"""Leases: who may write under a store key, until when; taken over when expired or when the holder died."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from pd_core.store.errors import LeaseHeldError, LeaseLostError, StoreError
from pd_core.store.formats import check_key, dumps_json, utc_iso
from pd_core.store.objects import ObjectStore

log = logging.getLogger("pd_core.store")

LEASE_NAME = "lease.json"


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


class Lease:
    """A held lease on a store key; a context manager that releases it on exit.

    Renew it more often than ``ttl_s`` while working; an expired lease may be taken over by
    another owner, after which :meth:`renew` raises :class:`LeaseLostError`.
    """

    def __init__(self, *, store: LeasingStore, key: str, owner: str, token: str, ttl_s: float,
                 expires_at: float, meta: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.key = key  # the leased key
        self.owner = owner
        self.token = token  # unique per acquisition: tells our lease from a later one by the same owner
        self.ttl_s = ttl_s
        self.expires_at = expires_at  # unix time
        self.meta = dict(meta or {})  # what the owner records about itself (e.g. its flow-run id)
        # The lease document of another owner this acquisition took over (its holder died or its lease
        # expired without a release): whoever held it did not finish. None when the key was free.
        self.taken_over: dict[str, Any] | None = None
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
        return f"Lease({self.uri!r}, owner={self.owner!r}, expires_at={utc_iso(self.expires_at)!r})"


class LeasingStore(ObjectStore):
    """An :class:`ObjectStore` that hands out leases on its keys (``lease.json`` in the key's folder).

    ``lease_settle_s``: on object stores, how long to wait before reading a written lease back.
    """

    def __init__(self, root: str, *, lease_settle_s: float = 0.2, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self._lease_settle_s = lease_settle_s

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
                "ttl_s": lease.ttl_s, "expires_at": utc_iso(lease.expires_at), "expires_at_unix": lease.expires_at,
                "renewed_at": utc_iso(time.time()), "meta": lease.meta}

    def _write_lease(self, key: str, doc: dict[str, Any]) -> None:
        """Write the lease; on object stores read it back to detect a concurrent writer."""
        folder = self._path(key)
        self._ensure_folder(folder)
        self._write_pointer(folder, LEASE_NAME, dumps_json(doc, what=LEASE_NAME, allow_nan=False))
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

    def acquire_lease(self, key: str, *, owner: str, ttl_s: float, meta: Mapping[str, str] | None = None) -> Lease:
        """Take the lease on ``key`` for ``ttl_s`` seconds; LeaseHeldError if another owner holds it unexpired.

        An expired lease, or one whose holder died (same host, pid gone), is taken over; the lease
        document found then is :attr:`Lease.taken_over`. The same ``owner`` may re-acquire its own (a
        retried run). ``meta`` (small strings) is stored in the lease for the next owner to read.
        Expiry uses each host's wall clock, so keep ttl_s well above the clock skew between hosts.
        """
        check_key(key)
        if not isinstance(owner, str) or not owner:
            raise ValueError("owner must be a non-empty string naming the run, e.g. its flow-run id")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        lease = Lease(store=self, key=key, owner=owner, token=uuid.uuid4().hex, ttl_s=float(ttl_s),
                      expires_at=time.time() + float(ttl_s), meta=meta)
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
        if current is not None and current.get("owner") != owner:
            lease.taken_over = dict(current)
            log.info("%s: took over the lease of %r (host %s, pid %s), which was never released", lease.uri,
                     current.get("owner"), current.get("host"), current.get("pid"))
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

