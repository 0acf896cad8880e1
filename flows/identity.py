"""How a pipeline's flow runs are found in Prefect: names from the pipeline, tags, the preset as a choice.

- Flow-run names: ``<pipeline>-<UTC start, minutes>`` (``smoke-2026-11-30T19-20``) for the pipeline,
  ``<pipeline>-teacher-<...>`` for the teacher flow; Prefect calls :func:`pipeline_run_name` /
  :func:`teacher_run_name` with the run's parameters in its context.
- Tags ``pipeline:<name>`` and ``preset:<preset>`` (a sweep's points also ``sweep:<name>`` and
  ``sweep-run:<the sweep's flow run id>``), added to the running flow run (they work for a
  ``pd run`` and for deployment runs alike, so the UI's tag filter finds every run of a pipeline).
- ``PresetName``: the flows' ``preset`` parameter type, a Literal of the shipped presets, which the
  deployments' run form shows as a choice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from prefect.context import get_run_context
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from pd_core.config import list_presets
from tasks.common import resolve_config

log = logging.getLogger(__name__)

PresetName = Literal[tuple(list_presets())]  # type: ignore[valid-type]  # the shipped presets, known at import


def pipeline_name(parameters: Mapping[str, Any]) -> str:
    """The pipeline name a flow run with these parameters resolves to (``name``, else its config's, else the preset).

    Resolved as the flow does (preset, config file, overrides); when that fails the flow itself will
    report why, so this falls back on the ``name`` or ``preset`` parameter.
    """
    try:
        cfg = resolve_config(preset=parameters.get("preset"), config_path=parameters.get("config_path"),
                             overrides=list(parameters.get("overrides") or []), name=parameters.get("name"))
    except Exception:  # noqa: BLE001 - a name must never stop the run; the flow reports a bad config itself
        return str(parameters.get("name") or parameters.get("preset") or "pipeline")
    return cfg.pipeline.name


def run_name(parameters: Mapping[str, Any], *, suffix: str = "", now: datetime | None = None) -> str:
    """``<pipeline><suffix>-<YYYY-MM-DDTHH-MM>`` (UTC)."""
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H-%M")
    return f"{pipeline_name(parameters)}{suffix}-{stamp}"


def _parameters() -> dict[str, Any]:
    return dict(flow_run.parameters or {})


def pipeline_run_name() -> str:
    """Prefect's ``flow_run_name`` of the pipeline flow: ``smoke-2026-11-30T19-20``."""
    return run_name(_parameters())


def teacher_run_name() -> str:
    """Prefect's ``flow_run_name`` of the teacher flow: ``smoke-teacher-2026-11-30T19-20``."""
    return run_name(_parameters(), suffix="-teacher")


def current_flow_run_id() -> str:
    """The running flow run's id; ``local`` outside a flow run (tests, notebooks)."""
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # noqa: BLE001 - called outside a flow run
        return "local"


def flow_run_page() -> tuple[str | None, str | None]:
    """The running flow run's name and its page in Prefect's UI (``PREFECT_UI_URL``, else derived from the API
    URL); ``(None, None)`` outside a flow run, the URL None when Prefect cannot say where its UI is."""
    try:
        run = get_run_context().flow_run
    except Exception:  # noqa: BLE001 - called outside a flow run
        return None, None
    try:
        url = url_for("flow-run", obj_id=run.id)
    except Exception:  # noqa: BLE001 - a link is a convenience: never fail a pipeline over it
        url = None
    return run.name, url


def run_tags(*, pipeline: str, preset: str | None) -> list[str]:
    """The tags a flow run of ``pipeline`` carries."""
    return [f"pipeline:{pipeline}"] + ([f"preset:{preset}"] if preset else [])


def sweep_tags(sweep: Mapping[str, str] | None) -> list[str]:
    """The tags of a sweep point's flow run: ``sweep:<name>`` and ``sweep-run:<the sweep's flow run id>`` (what
    a cancelled sweep looks its children up by); none outside a sweep."""
    if not sweep or "pd.sweep" not in sweep:
        return []
    try:
        parent = flow_run.get_parent_flow_run_id()
    except Exception:  # noqa: BLE001 - no API to ask: the name tag still finds the run
        parent = None
    return [f"sweep:{sweep['pd.sweep']}"] + ([f"sweep-run:{parent}"] if parent else [])


def tag_flow_run(tags: list[str]) -> None:
    """Add ``tags`` to the running flow run (kept: the tags it has, e.g. a deployment's). A failure only logs:
    tags help people find runs, they never stop one."""
    try:
        context = get_run_context()
        current = list(context.flow_run.tags or [])
        wanted = current + [t for t in tags if t not in current]
        if wanted != current:
            context.client.update_flow_run(context.flow_run.id, tags=wanted)
            context.flow_run.tags = wanted
    except Exception as err:  # noqa: BLE001 - cosmetic: never fail a pipeline over tags
        log.warning("could not tag the flow run with %s: %s", ", ".join(tags), err)
