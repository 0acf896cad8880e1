"""A run that died without ending (SIGKILL, power loss) leaves RUNNING records: end them on the next run.

The pipeline's lease names its holder (host, pid, and the Prefect flow-run id in its ``meta``). When
a run takes over the lease of a holder that died, :func:`end_dead_run` marks that holder's MLflow
runs (the pipeline's parent run, tagged ``prefect.flow_run_id``, and its RUNNING child runs) KILLED
and its Prefect flow run CRASHED, so neither UI shows a run as still going forever.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

FLOW_RUN_TAG = "prefect.flow_run_id"  # the tag the pipeline's parent MLflow run carries
_OWNER_FLOW_RUN = re.compile(r":flow-run-(?P<id>[0-9a-fA-F-]{36})$")


def dead_flow_run_id(lease_doc: Mapping[str, Any]) -> str | None:
    """The Prefect flow-run id of a lease's holder: its ``meta``, else the ``...:flow-run-<id>`` owner string."""
    meta = lease_doc.get("meta")
    candidate = meta.get("flow_run_id") if isinstance(meta, Mapping) else None
    if not candidate:
        m = _OWNER_FLOW_RUN.search(str(lease_doc.get("owner", "")))
        candidate = m.group("id") if m else None
    try:
        return str(uuid.UUID(str(candidate))) if candidate else None
    except ValueError:
        return None


def crash_flow_run(flow_run_id: str, *, message: str) -> bool:
    """Set the Prefect flow run CRASHED if it is not in a final state; True when it was changed.

    Never raises: a flow run this API does not know (another Prefect server or database) is left alone.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uuid.UUID(flow_run_id))
            if run.state is not None and run.state.is_final():
                return False
            client.set_flow_run_state(uuid.UUID(flow_run_id), Crashed(message=message), force=True)
            return True
    except Exception as err:  # noqa: BLE001 - bookkeeping of a dead run must not stop this one
        logging.getLogger("pd_core.reconcile").info("Prefect flow run %s of the dead run left as it is (%s)",
                                                    flow_run_id, type(err).__name__)
        return False


def end_dead_run(lease_doc: Mapping[str, Any], *, tracker: Any, logger: logging.Logger | logging.LoggerAdapter,
                 current_flow_run_id: str | None) -> None:
    """Mark the dead lease holder's MLflow runs KILLED and its Prefect flow run CRASHED; one log line."""
    flow_run_id = dead_flow_run_id(lease_doc)
    if flow_run_id is None or flow_run_id == current_flow_run_id:
        return
    holder = f"host {lease_doc.get('host')}, pid {lease_doc.get('pid')}"
    ended = tracker.end_abandoned_runs(tags={FLOW_RUN_TAG: flow_run_id}, status="KILLED")
    crashed = crash_flow_run(flow_run_id, message=f"the process ({holder}) died without ending the run; the next run "
                                                  f"of this pipeline took over its lease")
    logger.warning("the previous run of this pipeline (flow run %s, %s) died without ending: %d MLflow run(s) marked "
                   "KILLED, Prefect flow run %s", flow_run_id, holder, len(ended),
                   "marked CRASHED" if crashed else "left as it is (not RUNNING here)")
