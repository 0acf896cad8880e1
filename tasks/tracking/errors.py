"""Which tracking failures are worth retrying, and the one-line form every failure is reported in.

A call that fails because MLflow (or its database) is unreachable may work later: it is journaled.
Anything else is MLflow refusing the call for good (bad input): it is reported and dropped.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from tasks.tracking.redact import redact


class TrackingError(RuntimeError):
    """A model could not be loaded from MLflow (one-line message naming the URI)."""


class Unresolved(Exception):
    """A placeholder run id whose run creation is still in the journal."""


def one_line(err: BaseException) -> str:
    """First line of an exception message, redacted, for log lines."""
    text = str(err).strip().splitlines()
    return redact(f"{type(err).__name__}: {text[0] if text else ''}")[:300]


def is_transient(err: BaseException) -> bool:
    """True when MLflow (or its database) was unreachable, i.e. the same call may work later.

    The whole cause/context chain is searched: MLflow wraps connection failures in its own exceptions.
    """
    import requests  # mlflow depends on it; imported here to keep module import light

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, Unresolved):
            return True
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          ConnectionError, TimeoutError)):
            return True
        if isinstance(e, MlflowException):
            # rest_utils wraps every connection/retry failure as "API request to <url> failed with ..."
            if (e.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
                    or e.message.startswith("API request to")):
                return True
        if type(e).__module__.startswith("sqlalchemy") and type(e).__name__ in ("OperationalError", "TimeoutError"):
            return True
        e = e.__cause__ or e.__context__
    return False
