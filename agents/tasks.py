"""Celery entry points for the run engine. Thin: ids in, a service call, nothing returned."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from billiard.exceptions import Terminated, WorkerLostError
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from agentsite import logs
from agentsite.celery import CheckedTask
from agentsite.pools import connections_returned_if_killed

from . import engine, reconciler, webhooks
from .dispatch import advance_run_on_commit, tool_call_on_commit

logger = logging.getLogger(__name__)

# Database outages are retried by Celery (the state is in Postgres, so retrying is safe);
# provider and tool failures are retried by the engine, which counts attempts in Postgres.
DB_ERRORS = (OperationalError, InterfaceError)
# Failures of the infrastructure or of the worker, not of the message: the run's state in
# Postgres is intact, and the step's lease (or the reconciler, once the service is back)
# resumes it.
NOT_POISON = (
    *DB_ERRORS,
    RedisError,
    BrokerError,
    TimeLimitExceeded,
    SoftTimeLimitExceeded,
    WorkerLostError,
    Terminated,
)


class StepTask(CheckedTask):  # type: ignore[misc]
    """A task that performs a step of a run (its first argument is the run id).

    When it fails for good (its retries spent, or an error it does not retry), the run ends
    ``failed`` with the reason, rather than staying active for the reconciler to nudge into the
    same failure forever. Failures of Postgres, Redis or the worker itself are left to the
    leases and the reconciler, which resume the run once the service is back.
    """

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        run_id = (args[0] if args else None) or (kwargs or {}).get("run_id")
        if isinstance(exc, NOT_POISON):
            logger.error(
                "%s for run %s failed (%s: %s); the run is left to the reconciler",
                self.name,
                run_id,
                type(exc).__name__,
                exc,
            )
            return
        try:
            UUID(str(run_id))
        except ValueError:
            return  # no run to fail: the message was malformed (logged by the task)
        try:
            failed = engine.fail_after_crash(str(run_id), task=self.name, exc=exc)
        except Exception:
            logger.exception("%s: could not fail run %s after its task failed", self.name, run_id)
            return
        if failed:
            logger.error("%s: run %s failed: %s: %s", self.name, run_id, type(exc).__name__, exc)


# The two tasks that perform a run's steps: late acks, and Celery's own retries for a database
# outage only (the engine counts the step's attempts in Postgres).
STEP_TASK_OPTIONS: dict[str, Any] = {
    "base": StepTask,
    "acks_late": True,
    "autoretry_for": DB_ERRORS,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 8,
}


@shared_task(name="agents.advance_run", bind=True, **STEP_TASK_OPTIONS)
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
    with connections_returned_if_killed(), logs.bound(run_id=str(run_id)):
        outcome = engine.advance(run_id)
    if outcome.retry_in is not None:
        advance_run_on_commit(run_id, countdown=outcome.retry_in)


# Its name since the first wave (messages in flight during an upgrade still run).
@shared_task(name="tools.execute_tool_call", **STEP_TASK_OPTIONS)
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
        outcome = engine.execute_tool_call(run_id=run_id, step_index=step_index)
    if outcome.retry_in is not None:
        tool_call_on_commit(run_id, step_index, timeout=outcome.timeout, countdown=outcome.retry_in)


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
