"""Process environment for the orchestration layer: offline hygiene, the project home and the state home.

Imported (and :func:`prepare_environment` called) before Prefect or MLflow are imported by the
CLI, so their home folders and telemetry settings take effect. The project home ($PD_HOME or
./.pd) holds the embedded defaults (MLflow's sqlite file, the local store); the state home holds
Prefect's home and the outage journals of object stores: $PD_HOME when set, else ./.pd for runs
that use an embedded default, else $XDG_STATE_HOME/pd (~/.local/state/pd).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Our own logs say what happens; Prefect's per-task "Finished in state" lines are kept.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pd_core",
    # pd_core lines outside a flow run (pd eval, benchmarks) go to the console only, without a warning each.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def project_home() -> Path:
    """Folder of the embedded defaults (MLflow sqlite, local store): $PD_HOME or ./.pd."""
    return Path(os.environ.get("PD_HOME", ".pd")).resolve()


def user_state_home() -> Path:
    """Per-user state folder: $XDG_STATE_HOME/pd, else ~/.local/state/pd."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser().resolve() / "pd"


def state_home(*, local: bool = True) -> Path:
    """Where machine-local run state lives (Prefect's home, the MLflow outage journals of object stores).

    $PD_HOME when set; else ./.pd when ``local`` (the run keeps its embedded defaults there anyway);
    else the per-user state folder, so a run with explicit storage and tracking writes nothing into
    the working folder.
    """
    if os.environ.get("PD_HOME"):
        return project_home()
    return project_home() if local else user_state_home()


def offline_environment() -> None:
    """Telemetry off (unless the user set these variables) and pd_core's log lines routed to Prefect's run logs."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    attach_pd_core_logs()


def prepare_environment(*, local_state: bool = True) -> Path:
    """:func:`offline_environment`, and PREFECT_HOME = ``state_home(local=local_state)/prefect`` unless set.

    Returns the project home. ``local_state=False`` is for runs whose storage and tracking are both
    explicit: nothing then goes to ./.pd.
    """
    home = project_home()
    offline_environment()
    os.environ.setdefault("PREFECT_HOME", str(state_home(local=local_state) / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    return home


def attach_pd_core_logs() -> None:
    """Send pd_core's INFO lines (training progress, evaluation) to Prefect's run logs.

    A worker sets up Prefect's logging before the flow module is imported, so the
    PREFECT_LOGGING_EXTRA_LOGGERS default above comes too late there: attach the handler directly.
    """
    logger = logging.getLogger("pd_core")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    # Prefect's API handlers only (none exist before Prefect's logging is imported; importing it here
    # would come before PREFECT_HOME is set): anything else on prefect.extra at that moment, such as a
    # test harness's log-capturing handler, is not ours to copy and would see pd_core's records twice
    handlers = sys.modules.get("prefect.logging.handlers")
    for handler in logging.getLogger("prefect.extra").handlers if handlers else ():
        if isinstance(handler, handlers.APILogHandler) and handler not in logger.handlers:
            logger.addHandler(handler)
