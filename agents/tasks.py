"""Celery entry points for the run engine. Thin: ids in, a service call, nothing returned."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from agentsite.pools import connections_returned_if_killed

from . import engine, reconciler, webhooks
from .dispatch import advance_run_on_commit

logger = logging.getLogger(__name__)

# Database outages are retried by Celery (the state is in Postgres, so retrying is safe);
# provider and tool failures are retried by the engine, which counts attempts in Postgres.
DB_ERRORS = (OperationalError, InterfaceError)


@shared_task(
    name="agents.advance_run",
    bind=True,
    acks_late=True,
    autoretry_for=DB_ERRORS,
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=8,
)
def advance_run(self: object, run_id: str) -> None:
    """Decide and perform the next step of a run (a model call, or enqueueing tool calls).

    Idempotent: a duplicate or redelivered message finds the step claimed or done and returns.
    A transient model failure re-enqueues this task with a backoff countdown.
    """
    try:
        UUID(str(run_id))
    except ValueError:
        logger.error("advance_run: rejected malformed run id %r", run_id)
        return
    with connections_returned_if_killed():
        outcome = engine.advance(run_id)
    if outcome.retry_in is not None:
        advance_run_on_commit(run_id, countdown=outcome.retry_in)


@shared_task(name="agents.reconcile_runs", acks_late=True, ignore_result=True)
def reconcile_runs() -> None:
    """Periodic (beat): nudge runs whose messages were lost."""
    reconciler.reconcile_stalled_runs()


@shared_task(
    name="agents.deliver_webhook",
    bind=True,
    acks_late=True,
    max_retries=None,  # bounded by AGENTSITE_WEBHOOK_MAX_ATTEMPTS below
    soft_time_limit=60,
    time_limit=90,
)
def deliver_webhook(self: Any, run_id: str) -> None:
    """POST a finished run to its webhook; retried with exponential backoff and jitter."""
    attempt = self.request.retries + 1
    final = attempt >= settings.AGENTSITE_WEBHOOK_MAX_ATTEMPTS
    try:
        webhooks.deliver(run_id, attempt=attempt, final_attempt=final)
    except webhooks.WebhookFailed as exc:
        raise self.retry(countdown=engine.backoff_seconds(attempt), exc=exc) from None
