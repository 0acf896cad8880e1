"""Process environment for the orchestration layer: offline hygiene and project-local state.

Imported (and :func:`prepare_environment` called) before Prefect or MLflow are imported by the
CLI, so their home folders and telemetry settings take effect.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Our own logs say what happens; Prefect's per-task "Finished in state" lines are kept.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pd_core",
}


def project_home() -> Path:
    """Folder for embedded-default state (ephemeral Prefect DB, MLflow sqlite, local store): $PD_HOME or ./.pd."""
    return Path(os.environ.get("PD_HOME", ".pd")).resolve()


def prepare_environment() -> Path:
    """Set telemetry off and a project-local PREFECT_HOME unless the user set them; returns the project home."""
    home = project_home()
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    attach_pd_core_logs()
    return home


def attach_pd_core_logs() -> None:
    """Send pd_core's INFO lines (training progress, evaluation) to Prefect's run logs.

    A worker sets up Prefect's logging before the flow module is imported, so the
    PREFECT_LOGGING_EXTRA_LOGGERS default above comes too late there: attach the handler directly.
    """
    logger = logging.getLogger("pd_core")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
