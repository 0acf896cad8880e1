"""Prefect's temporary API server for embedded runs, started before this process imports Prefect.

Without ``PREFECT_API_URL`` Prefect starts a temporary server itself (``SubprocessASGIServer``), but
only when the flow makes its first client: after this process has imported Prefect, MLflow and
torch, and after it has also imported ``prefect.server`` just to reach that class. The server's
start (and, in a fresh home, its database migrations) then lies on the flow's critical path
(benchmarks/speed/RESULTS.md has the numbers).

:func:`spawn` launches the same server (the same uvicorn command and environment markers as
Prefect's) as soon as ``pd run`` has validated its config, so the start runs on another core while
this process imports; :meth:`EmbeddedServer.attach` then points Prefect at it through
``PREFECT_API_URL``. The server lives exactly as long as this process: it is stopped at exit, and
on Linux the kernel stops it if this process dies without running exit handlers. It runs in a
session of its own, so a Ctrl-C (SIGINT to the terminal's process group) reaches only the run.

The server is marked as embedded (``PD_EMBEDDED_PREFECT_API_URL``) so the flows still treat it as
the one-process server it is (no ``gpu`` tag: see ``tasks.common.gpu_task_tags``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping

from pd_core.net import free_port

EMBEDDED_URL_ENV = "PD_EMBEDDED_PREFECT_API_URL"
EARLY_START_ENV = "PD_PREFECT_EARLY_START"  # "0": leave the start to Prefect (the benchmark's baseline)
# Prefect's own temporary server uses these (prefect.server.api.server.SubprocessASGIServer): no UI,
# only the services an ephemeral server needs.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
EXIT_PORT_IN_USE = 3  # uvicorn's exit status when the port is taken

log = logging.getLogger("pd_core.prefect_server")


def is_embedded(api_url: str | None, *, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``api_url`` is the server this process started (a standing server is never embedded)."""
    environ = os.environ if environ is None else environ
    return bool(api_url) and api_url == environ.get(EMBEDDED_URL_ENV)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the atexit handler still stops it on a normal exit
        pass


def _uvicorn_command(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]


class EmbeddedServer:
    """One uvicorn process serving Prefect's API on a loopback port, owned by this process."""

    def __init__(self, *, process: subprocess.Popen, port: int, started: float,
                 launch: Callable[[int], subprocess.Popen]) -> None:
        self.process = process
        self.port = port
        self.started = started
        self._launch = launch
        self.attached = False
        self._set_ui_url = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def healthy(self, *, timeout_s: float = 0.5) -> bool:
        """One short look at the server (False while it is still starting).

        Asks ``/api/admin/version`` rather than ``/api/health``: the server's first real request pays
        its lazy set-up, which the probe then pays in the start-up window instead of the flow.
        """
        try:
            url = f"{self.api_url}/admin/version"  # http://127.0.0.1:<port>: our own server
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - fixed http URL
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, *, timeout_s: float) -> bool:
        """Block until the server answers (True), or it exits or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        retried = False
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == EXIT_PORT_IN_USE and not retried:  # another process took the port meanwhile
                self.port, retried = free_port(), True
                self.process = self._launch(self.port)
                continue
            if status is not None:
                return False
            if self.healthy():
                return True
            time.sleep(0.05)
        return False

    def attach(self, *, timeout_s: float | None = None) -> bool:
        """Point this process's Prefect at the server, once it answers; False (and stopped) if it cannot.

        Call after importing Prefect. If Prefect is already configured with an API URL (a profile or
        prefect.toml can set one, which is only known once Prefect has read its settings), or the
        server does not come up within ``timeout_s`` (default: Prefect's own limit for its temporary
        server, at least 60 s), the server is stopped and Prefect does what it would have done
        without it; nothing is lost but the start.
        """
        import prefect.context
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        refresh = getattr(prefect.context, "refresh_global_settings_context", None)
        if settings.api.url or refresh is None:
            self.stop()
            return False
        if timeout_s is None:  # Prefect's own limit for its temporary server (a setting of recent versions)
            ephemeral = getattr(getattr(settings, "server", None), "ephemeral", None)
            timeout_s = max(60.0, float(getattr(ephemeral, "startup_timeout_seconds", 0) or 0))
        if not self.wait(timeout_s=timeout_s):
            log.warning("the early-started Prefect server did not answer (exit status %s): Prefect starts its own",
                        self.process.poll())
            self.stop()
            return False
        self._set_ui_url = "PREFECT_UI_URL" not in os.environ
        os.environ.update({"PREFECT_API_URL": self.api_url, EMBEDDED_URL_ENV: self.api_url})
        if self._set_ui_url:  # no UI is served (as with Prefect's own temporary server): no "View at" links
            os.environ["PREFECT_UI_URL"] = ""
        self.attached = True
        refresh()  # Prefect read its settings at import: every thread now sees the URL
        if get_current_settings().api.url != self.api_url:  # this thread runs in a settings context of its own
            self.stop()
            return False
        log.info("Prefect API: temporary server %s, up %.1f s after launch (set PREFECT_API_URL for a "
                 "standing server)", self.api_url, time.perf_counter() - self.started,
                 extra={"send_to_api": False})  # no flow run yet
        return True

    @contextlib.contextmanager
    def flow_settings(self) -> Iterator[None]:
        """Settings for a flow run on this server: no flow-run heartbeats.

        Heartbeats let a standing server notice a crashed run; this server dies with the run, so they
        tell nobody anything, and stopping their thread costs each flow up to 1 s at exit (it sleeps
        in 1 s steps).
        """
        try:
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
        except ImportError:  # a Prefect without flow-run heartbeats
            yield
            return
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and take its URL out of the environment."""
        if self.attached:
            for key in ("PREFECT_API_URL", EMBEDDED_URL_ENV):
                if os.environ.get(key) == self.api_url:
                    del os.environ[key]
            if self._set_ui_url and os.environ.get("PREFECT_UI_URL") == "":
                del os.environ["PREFECT_UI_URL"]
            self.attached = False
            import prefect.context

            prefect.context.refresh_global_settings_context()  # forget the URL of a server that is gone
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(*, environ: Mapping[str, str] | None = None) -> EmbeddedServer | None:
    """Launch the embedded server unless a Prefect API is set or PD_PREFECT_EARLY_START=0; returns its handle.

    Call from the main thread (the kernel's parent-death signal follows the spawning thread) and
    before importing Prefect. The caller must :meth:`~EmbeddedServer.attach` (or ``stop``) it.
    """
    environ = dict(os.environ if environ is None else environ)
    if environ.get("PREFECT_API_URL") or environ.get(EARLY_START_ENV, "1") == "0":
        return None
    if "prefect.settings" in sys.modules:  # Prefect already loaded (a test, a notebook): ask it, it is cheap now
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            return None
    env = {**environ, **SERVER_ENV}

    def launch(port: int) -> subprocess.Popen:
        # A session of its own: a Ctrl-C to the run's process group stops the run, which then reports to a
        # live server, not the server under it (tasks.prefect_watch would take that for a dead API).
        return subprocess.Popen(_uvicorn_command(port), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    port = free_port()
    server = EmbeddedServer(process=launch(port), port=port, started=time.perf_counter(), launch=launch)
    atexit.register(server.stop)
    return server
