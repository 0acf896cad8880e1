"""Process environment for the orchestration layer: offline hygiene and project-local state.

Imported (and :func:`prepare_environment` called) before Prefect or MLflow are imported by the
CLI, so their home folders and telemetry settings take effect.
"""

from __future__ import annotations

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
    return home
