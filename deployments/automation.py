"""Round notifications as a Prefect automation: each `pd.round.completed` event to a notification block.

The trigger matches the event of every pipeline (resource `pd.pipeline.<name>`); its one action,
`send-notification`, renders SUBJECT and BODY (Prefect's user templates, with the event in context) on the
server and sends them through a notification block (Slack, e-mail, a webhook: created in the UI or in code).
Nothing runs on a worker, so Prefect's run list holds the pipelines' runs only; the automation's
firings are in the UI's *Automations* and *Events* pages. `python -m deployments.deploy --notify-block
TYPE/NAME` creates it, replacing an earlier one of the same name.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

AUTOMATION_NAME = "pd-round-notify"
EVENT = "pd.round.completed"
SUBJECT = "pd: {{ event.resource.name }} round {{ event.payload.round }} completed"
BODY = ("pipeline {{ event.resource.name }}: round {{ event.payload.round }} completed "
        "({{ event.payload.teacher_steps }} -> {{ event.payload.student_steps }} steps; "
        "{% if event.payload.trained %}trained{% else %}reused{% endif %}); "
        "checkpoint {{ event.payload.checkpoint_uri }}"
        "{% for key, value in (event.payload.metrics or {}).items() if value is number %}"
        ", {{ key }} {{ '%.4g' | format(value) }}{% endfor %}")


def round_notify_automation(*, block_document_id: UUID) -> Any:
    """The automation (not yet created): every `pd.round.completed` event -> one notification."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=AUTOMATION_NAME,
        description="Send one line per finished distillation round (pd.round.completed) to a notification block.",
        trigger=EventTrigger(expect={EVENT}, match={"prefect.resource.id": "pd.pipeline.*"},
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def ensure_round_notify_automation(client: Any, *, block: str) -> UUID:
    """Create the automation for the notification block ``block`` (``type-slug/name``), replacing automations
    of the same name; its id. ``client``: a synchronous Prefect client."""
    from prefect.blocks.core import Block
    from prefect.events.schemas.automations import AutomationCore

    loaded = Block.load(block)
    block_id = loaded._block_document_id  # noqa: SLF001 - the id Block.load read; Prefect has no public getter
    if block_id is None:
        raise ValueError(f"notification block {block!r} has no id on the server")
    for old in client.read_automations_by_name(AUTOMATION_NAME):
        client.delete_automation(old.id)
    automation = round_notify_automation(block_document_id=block_id)
    return client.create_automation(AutomationCore(**automation.model_dump(exclude={"id"})))
