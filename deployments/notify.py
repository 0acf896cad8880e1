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


@flow(name="pd-round-notify")
def round_completed_notify(
    pipeline: str,
    payload: dict[str, Any] | None = None,
    notify_block: str | None = None,
) -> str:
    """Report one finished round; `notify_block` is "<block-type-slug>/<block-name>"."""
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
