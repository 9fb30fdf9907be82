"""Publishing nudges to Celery, always after the transaction that wrote the rows they point at.

Tasks are sent by name so the engine never imports task modules (no import cycles), and routes
come from ``CELERY_TASK_ROUTES``. A failed publish is logged, not raised: the row is committed
and the reconciler nudges the run again, so a broker outage loses no run.
"""

from __future__ import annotations

import logging
from uuid import UUID

from django.conf import settings
from django.db import transaction

from agentsite.celery import app

logger = logging.getLogger(__name__)


def _send(name: str, args: list[object], **options: object) -> None:
    try:
        app.send_task(name, args=args, **options)
    except Exception:
        logger.exception("could not publish %s%s; the reconciler will retry", name, args)


def advance_run_on_commit(run_id: UUID | str, *, countdown: float | None = None) -> None:
    """Nudge ``advance_run(run_id)`` once the current transaction commits."""
    transaction.on_commit(lambda: _send("agents.advance_run", [str(run_id)], countdown=countdown))


def tool_call_on_commit(
    run_id: UUID | str, step_index: int, *, timeout: int, countdown: float | None = None
) -> None:
    """Enqueue ``execute_tool_call(run_id, step_index)`` with the tool's own time limits."""
    transaction.on_commit(
        lambda: _send(
            "tools.execute_tool_call",
            [str(run_id), step_index],
            countdown=countdown,
            soft_time_limit=timeout,
            time_limit=timeout + settings.AGENTSITE_TOOL_HARD_LIMIT_GRACE,
        )
    )


def webhook_on_commit(run_id: UUID | str) -> None:
    """Deliver the finished run's webhook once the current transaction commits."""
    transaction.on_commit(lambda: _send("agents.deliver_webhook", [str(run_id)]))


def outbox_relay_on_commit() -> None:
    """Ask the outbox relay to deliver new side effects once the current transaction commits."""
    transaction.on_commit(lambda: _send("tools.deliver_outbox", []))
