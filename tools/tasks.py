"""Celery entry point for tool calls: each call of a model turn is its own task."""

from __future__ import annotations

import logging
from uuid import UUID

from celery import shared_task

from agents.dispatch import tool_call_on_commit
from agents.tasks import DB_ERRORS, StepTask
from agentsite import logs
from agentsite.pools import connections_returned_if_killed

from . import services

logger = logging.getLogger(__name__)


@shared_task(
    name="tools.execute_tool_call",
    base=StepTask,
    acks_late=True,
    autoretry_for=DB_ERRORS,
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=8,
)
def execute_tool_call(run_id: str, step_index: int) -> None:
    """Run one tool step (time limits are the tool's, set by the publisher) and nudge the run.

    Idempotent: a redelivered message finds the step done or held by a live worker.
    """
    try:
        UUID(str(run_id))
        step_index = int(step_index)
    except (TypeError, ValueError):
        logger.error("execute_tool_call: rejected malformed arguments %r %r", run_id, step_index)
        return
    with connections_returned_if_killed(), logs.bound(run_id=str(run_id), step=step_index):
        outcome = services.execute_tool_call(run_id=run_id, step_index=step_index)
    if outcome.retry_in is not None:
        tool_call_on_commit(run_id, step_index, timeout=outcome.timeout, countdown=outcome.retry_in)


@shared_task(name="tools.deliver_outbox", acks_late=True, ignore_result=True)
def deliver_outbox() -> int:
    """Deliver pending side effects from the outbox (nudged on commit, and by beat)."""
    from .relay import deliver_pending

    return deliver_pending()
