"""Training progress made visible in Prefect (progress artifact + log line) and MLflow (loss by step)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from pd_core.train import ProgressEvent


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


class ProgressReporter:
    """Callback for pd_core's training loop: one log line per event, a live progress artifact, loss to MLflow.

    Prefect or MLflow failures never stop training: progress is best-effort.
    """

    def __init__(self, *, key: str, description: str, logger: logging.Logger | logging.LoggerAdapter,
                 log_metrics: Callable[[dict[str, float], int], None] | None = None,
                 heartbeat: Callable[[], None] | None = None):
        self.logger = logger
        self.log_metrics = log_metrics
        self.heartbeat = heartbeat
        self.artifact_id = None
        self._last_update = 0.0
        try:
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(progress=0.0, key=artifact_key(key), description=description)
        except Exception as err:  # noqa: BLE001 - no Prefect run context (e.g. a notebook): progress is best-effort
            logger.debug("no progress artifact: %s", err)

    def __call__(self, event: ProgressEvent) -> None:
        # The line itself is logged by pd_core.train (Prefect captures that logger): not twice.
        if self.log_metrics is not None:
            self.log_metrics({"train_loss": event.loss, "lr": event.lr, "it_per_s": event.it_per_s}, event.step)
        if self.heartbeat is not None:
            self.heartbeat()
        now = time.monotonic()
        if self.artifact_id is not None and (now - self._last_update > 2.0 or event.step == event.total):
            self._last_update = now
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact_id, progress=100.0 * event.step / max(event.total, 1))
            except Exception as err:  # noqa: BLE001 - progress never stops training
                self.logger.debug("progress artifact update failed: %s", err)
