"""A small flow run by the `pd-notify` deployment for every `pd.round.completed` event.

It logs one line per finished round, keeps a markdown artifact per pipeline in the Prefect UI and,
when given a notification block (e.g. a Slack webhook created in the UI), sends the same line
there. It reads only the event payload: no tensors, no credentials.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

# Payload keys shown first, in this order, when present; the rest follow alphabetically.
_FIRST_KEYS = ("round", "teacher_steps", "student_steps", "steps", "checkpoint_uri")
_SCALARS = (str, int, float, bool)


def _artifact_key(pipeline: str) -> str:
    """An artifact key (lowercase letters, digits, dashes) derived from the pipeline name."""
    return "pd-rounds-" + (re.sub(r"[^a-z0-9-]+", "-", pipeline.lower()).strip("-") or "unnamed")


def _fields(payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """Scalar payload fields, nested dicts (e.g. metrics) flattened one level as `key.sub`."""
    keys = [k for k in _FIRST_KEYS if k in payload]
    keys += sorted(k for k in payload if k not in keys)
    out: list[tuple[str, Any]] = []
    for k in keys:
        value = payload[k]
        if isinstance(value, _SCALARS):
            out.append((k, value))
        elif isinstance(value, dict):
            out += [(f"{k}.{sub}", v) for sub, v in sorted(value.items()) if isinstance(v, _SCALARS)]
    return out


def _summary(pipeline: str, payload: dict[str, Any]) -> str:
    """One human-readable line: the pipeline and the payload's scalar fields."""
    fields = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in _fields(payload)
    )
    return f"pipeline {pipeline}: round completed ({fields})"


def round_label(pipeline: str, payload: dict[str, Any] | None) -> str:
    """``smoke-round-03-2to1``: the pipeline and the round a payload reports (as the round's task is named)."""
    payload = payload or {}
    try:
        index, t, s = int(payload["round"]), int(payload["teacher_steps"]), int(payload["student_steps"])
    except (KeyError, TypeError, ValueError):
        return f"{pipeline}-round" + (f"-{payload['round']}" if isinstance(payload.get("round"), _SCALARS) else "")
    return f"{pipeline}-round-{index:02d}-{t}to{s}"


def notify_run_name() -> str:
    """Prefect's ``flow_run_name`` of the notify flow: the round it reports."""
    parameters = flow_run.parameters or {}
    return round_label(str(parameters.get("pipeline") or "pipeline"), parameters.get("payload"))


@flow(name="pd-round-notify", flow_run_name=notify_run_name)
def round_completed_notify(
    pipeline: str,
    payload: dict[str, Any] | None = None,
    notify_block: str | None = None,
) -> str:
    """Report one finished round.

    Args:
        pipeline: The pipeline the round belongs to (from the event's resource, pd.pipeline.<name>).
        payload: The pd.round.completed event's payload: round, step counts, checkpoint, metrics.
        notify_block: A notification block to send the line to, "<block-type-slug>/<block-name>"
            (e.g. slack-webhook/team); none: the line is only logged and kept as an artifact.
    """
    logger = get_run_logger()
    payload = payload or {}
    line = _summary(pipeline, payload)
    logger.info(line)
    create_markdown_artifact(
        key=_artifact_key(pipeline),
        markdown=f"### {pipeline}\n\n{line}\n",
        description=f"Latest finished round of pipeline {pipeline}",
    )
    if notify_block:
        from prefect.blocks.core import Block

        block = Block.load(notify_block)
        block.notify(body=line, subject=f"pd: {pipeline} round completed")  # type: ignore[attr-defined]
    return line
