"""Which storage errors are transient, retrying those with exponential backoff, and the user's fix for each."""

from __future__ import annotations

import errno
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pd_core.store.errors import StoreError

log = logging.getLogger("pd_core.store")

T = TypeVar("T")


def _loaded_attr(module: str, name: str) -> Any:
    """``module.name`` if that module is already imported, else None.

    An exception can only be a botocore/aiohttp type if that library is loaded, so classifying
    errors never imports them (a local store stays free of the S3 stack).
    """
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def storage_error_types() -> tuple[type[BaseException], ...]:
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
          sleep: Callable[[float], None] = time.sleep, what: str | None = None) -> T:
    """Call ``fn()``; on a transient error wait base_delay * 2**i (capped at max_delay) and try again.

    Gives up after ``attempts`` calls and re-raises the last error; non-transient errors are
    raised at once. Each retry is one warning line (naming ``what``, e.g. "write s3://b/k", when given).
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
            log.warning("transient storage error%s (%s), retry %d/%d in %.2fs", f" on {what}" if what else "",
                        one_line(err), attempt + 1, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # the loop either returns or raises


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (error messages must stay one line)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def storage_hint(err: BaseException) -> str:
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

