"""A watch on the Prefect API a ``pd run`` reports to: when it stops answering, the run stops at once.

Without it, a run whose API server died keeps training while every log line and state change waits
on Prefect's client retries (about 70 s each), and the run ends minutes later in a
connection-refused traceback. The watch looks every ``interval_s``:

* the embedded server (:mod:`tasks.prefect_server`) is dead when its process has exited;
* a standing server is dead after ``misses`` consecutive probes that get no HTTP answer within
  ``timeout_s`` (any HTTP status, 401 included, or a TLS handshake counts as an answer: the server is up);
* Prefect's own temporary server (``PD_PREFECT_EARLY_START=0``) is not watched.

A dead API ends the process like a kill: one line on stderr, exit status 1, no exit handlers.
That is the fault the store and the tracker already survive (docs/faults.md): checkpoints are
published atomically, the rerun takes over the dead process's lease, resumes the round from its
last in-round state, and marks the dead run's MLflow runs KILLED.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

EXIT_API_GONE = 1


def standing_server_answers(api_url: str, *, timeout_s: float) -> bool:
    """True when ``api_url``'s ``/health`` gives any HTTP answer within ``timeout_s``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s):  # noqa: S310 - the run's API
            return True
    except urllib.error.HTTPError:  # an answer, e.g. 401 from a server with an auth string
        return True
    except urllib.error.URLError as err:  # a TLS handshake that fails on verification: a server is there
        return isinstance(err.reason, ssl.SSLError)
    except (OSError, ValueError):
        return False


def gone_message(api_url: str) -> str:
    return (f"error: the Prefect API at {api_url} stopped answering mid-run; the checkpoints saved so far are "
            "kept: rerun the same command to continue")


def _exit_now(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_API_GONE)


class ApiWatch:
    """A daemon thread that calls ``on_gone`` (default: one line and exit 1) once the API is dead."""

    def __init__(self, *, api_url: str, alive: Callable[[], bool], interval_s: float, misses: int,
                 on_gone: Callable[[str], None] = _exit_now) -> None:
        self.api_url, self._alive, self._interval_s, self._misses = api_url, alive, interval_s, misses
        self._on_gone = on_gone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pd-prefect-api-watch", daemon=True)

    def _watch(self) -> None:
        missed = 0
        while not self._stop.wait(self._interval_s):
            missed = 0 if self._alive() else missed + 1
            if missed >= self._misses and not self._stop.is_set():
                self._on_gone(gone_message(self.api_url))
                return

    def __enter__(self) -> ApiWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def watch_api(*, embedded_process=None, api_url: str | None, interval_s: float = 0.5, misses: int = 6,
              timeout_s: float = 2.0, on_gone: Callable[[str], None] = _exit_now) -> ApiWatch | None:
    """The watch for this run's API: the embedded server's process, else a standing ``api_url``; None without one.

    A dead embedded process is final (one look); a standing server gets ``misses`` probes in a row
    (about ``misses * (interval_s + timeout_s)`` seconds) before the run gives up on it.
    """
    if embedded_process is not None:
        url = api_url or "the embedded server"
        return ApiWatch(api_url=url, alive=lambda: embedded_process.poll() is None, interval_s=interval_s,
                        misses=1, on_gone=on_gone)
    if not api_url:
        return None
    return ApiWatch(api_url=api_url, alive=lambda: standing_server_answers(api_url, timeout_s=timeout_s),
                    interval_s=interval_s, misses=misses, on_gone=on_gone)
