"""Celery entry points for the run engine. Thin: ids in, a service call, nothing returned."""

from __future__ import annotations

import logging
from uuid import UUID

from celery import shared_task
from django.db import InterfaceError, OperationalError

from . import engine, reconciler
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
    outcome = engine.advance(run_id)
    if outcome.retry_in is not None:
        advance_run_on_commit(run_id, countdown=outcome.retry_in)


@shared_task(name="agents.reconcile_runs", acks_late=True, ignore_result=True)
def reconcile_runs() -> None:
    """Periodic (beat): nudge runs whose messages were lost."""
    reconciler.reconcile_stalled_runs()
