"""Celery tasks of the tools app: delivering the outbox. (A tool call's task,
``tools.execute_tool_call``, is the engine's: agents/tasks.py.)"""

from __future__ import annotations

from celery import shared_task

from .relay import deliver_pending


@shared_task(name="tools.deliver_outbox", acks_late=True, ignore_result=True)
def deliver_outbox() -> int:
    """Deliver pending side effects from the outbox (nudged on commit, and by beat)."""
    return deliver_pending()
