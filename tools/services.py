"""Executing tool calls: claim the step, run the tool outside any transaction, record the result.

A tool call is its own Celery task. The step is claimed with a conditional UPDATE so concurrent
or redelivered tasks run it at most once at a time; the tool receives an idempotency key that is
the same on every attempt, so an external side effect can be made to happen at most once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, transaction
from django.db.models import F
from django.utils import timezone

from agents import audit
from agents.dispatch import advance_run_on_commit
from agents.engine import backoff_seconds
from agents.jsonsafe import json_safe
from agents.models import Run, Step

from .registry import ToolContext, ToolError, TransientToolError, registry

logger = logging.getLogger(__name__)


@dataclass
class ToolOutcome:
    retry_in: float | None = None
    timeout: int = 30


def _claim(run_id: UUID | str, step_index: int) -> Step | None:
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            return None
        step = Step.objects.filter(run=run, index=step_index, kind=Step.Kind.TOOL).first()
        if step is None or step.status in Step.DONE_STATUSES:
            return None
        if run.is_final:
            Step.objects.filter(pk=step.pk, status=Step.Status.PENDING).update(
                status=Step.Status.CANCELLED, finished_at=timezone.now()
            )
            return None
        if run.status != Run.Status.RUNNING:
            return None  # e.g. waiting for a human; the step waits too
        now = timezone.now()
        if step.status == Step.Status.PENDING and step.not_before and step.not_before > now:
            return None  # backing off; the delayed task (or the reconciler) comes back
        if (
            step.status == Step.Status.RUNNING
            and step.lease_expires_at
            and (step.lease_expires_at > now)
        ):
            return None  # a live worker has it
        if step.status == Step.Status.RUNNING and step.attempts >= _max_attempts(step.tool_name):
            # Its worker died (killed, or over the hard time limit) on every attempt: stop
            # rather than repeat a side effect forever, and let the model read the failure.
            Step.objects.filter(pk=step.pk, status=Step.Status.RUNNING).update(
                status=Step.Status.FAILED,
                error=f"the worker performing it was lost on all {step.attempts} attempts",
                finished_at=now,
                lease_expires_at=None,
            )
            audit.record(
                "tool_call.failed",
                run=run,
                step_index=step.index,
                payload={"tool": step.tool_name, "error": "worker lost on every attempt"},
            )
            advance_run_on_commit(run.pk)
            return None
        claimed = Step.objects.filter(
            pk=step.pk, status=step.status, attempts=step.attempts
        ).update(
            status=Step.Status.RUNNING,
            attempts=F("attempts") + 1,
            started_at=now,
            not_before=None,
            lease_expires_at=now + timedelta(seconds=_lease_seconds(step.tool_name)),
        )
        if not claimed:
            return None
        step.refresh_from_db()
        if step.attempts > 1:
            audit.record(
                "tool_call.attempt",
                run=run,
                step_index=step.index,
                payload={"tool": step.tool_name, "attempt": step.attempts},
            )
        return step


def _lease_seconds(tool_name: str) -> int:
    """Past the tool's hard time limit (its timeout + 10 s) and a margin, its worker is dead."""
    spec = registry.get(tool_name)
    return (spec.timeout if spec else 30) + 40


def _max_attempts(tool_name: str) -> int:
    spec = registry.get(tool_name)
    return max(settings.AGENTSITE_STEP_MAX_ATTEMPTS, spec.retries + 1 if spec else 1)


def _jsonable(value: Any) -> Any:
    # allow_nan=False: Postgres jsonb refuses NaN and Infinity, so such a result is a tool error.
    return json_safe(json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False)))


def execute_tool_call(*, run_id: UUID | str, step_index: int) -> ToolOutcome:
    """Perform one tool step of a run, at most once at a time, and nudge the run when done.

    Transient failures (TransientToolError, timeouts, connection errors) are retried with
    backoff up to the tool's ``retries``; other failures are reported to the model.
    """
    step = _claim(run_id, step_index)
    if step is None:
        return ToolOutcome()
    spec = registry.get(step.tool_name)
    if spec is None:
        _record(step, error=f"tool {step.tool_name!r} is no longer installed", latency_ms=0)
        return ToolOutcome()
    ctx = ToolContext(
        run_id=str(step.run_id),
        step_index=step.index,
        idempotency_key=step.idempotency_key,
        attempt=step.attempts,
    )
    started = time.monotonic()
    transient: Exception | None = None
    try:
        args = spec.validate(step.request.get("arguments"))
        result = _jsonable(spec.func(args, ctx))
    except (
        TransientToolError,
        SoftTimeLimitExceeded,
        TimeoutError,
        ConnectionError,
        DatabaseError,
    ) as exc:
        transient = exc
    except ToolError as exc:
        _record(step, error=str(exc), latency_ms=_ms(started))
        return ToolOutcome()
    except Exception as exc:
        logger.exception("tool %s crashed in run %s step %s", spec.name, step.run_id, step.index)
        _record(
            step, error=f"the tool crashed: {type(exc).__name__}: {exc}", latency_ms=_ms(started)
        )
        return ToolOutcome()
    else:
        _record(step, result=result, latency_ms=_ms(started))
        return ToolOutcome()

    reason = (
        f"timed out after {spec.timeout}s"
        if isinstance(transient, SoftTimeLimitExceeded)
        else f"{type(transient).__name__}: {transient}"
    )
    if step.attempts <= spec.retries:
        delay = backoff_seconds(step.attempts)
        with transaction.atomic():
            run = Run.objects.select_for_update().get(pk=step.run_id)
            released = Step.objects.filter(
                pk=step.pk, status=Step.Status.RUNNING, attempts=step.attempts
            ).update(
                status=Step.Status.PENDING,
                error=json_safe(reason),
                lease_expires_at=None,
                not_before=timezone.now() + timedelta(seconds=delay),
            )
            if released:
                Run.objects.filter(pk=run.pk).update(updated_at=timezone.now())
                audit.record(
                    "step.retry_scheduled",
                    run=run,
                    step_index=step.index,
                    payload={
                        "tool": spec.name,
                        "attempt": step.attempts,
                        "error": reason,
                        "retry_in": round(delay, 2),
                    },
                )
        return ToolOutcome(retry_in=delay if released else None, timeout=spec.timeout)
    _record(
        step,
        error=f"gave up after {step.attempts} attempts: {reason}",
        latency_ms=_ms(started),
    )
    return ToolOutcome()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _record(step: Step, *, result: Any = None, error: str = "", latency_ms: int) -> None:
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=step.run_id)
        status = Step.Status.FAILED if error else Step.Status.SUCCEEDED
        if run.status != Run.Status.RUNNING:
            status = Step.Status.CANCELLED
        recorded = Step.objects.filter(
            pk=step.pk, status=Step.Status.RUNNING, attempts=step.attempts
        ).update(
            status=status,
            response=result,
            error=json_safe(error),
            latency_ms=latency_ms,
            finished_at=timezone.now(),
            lease_expires_at=None,
        )
        if not recorded:
            return
        Run.objects.filter(pk=run.pk).update(updated_at=timezone.now())
        audit.record(
            f"tool_call.{'failed' if error else 'succeeded'}",
            run=run,
            step_index=step.index,
            payload={"tool": step.tool_name, "error": error, "latency_ms": latency_ms}
            if error
            else {"tool": step.tool_name, "latency_ms": latency_ms},
        )
        if run.status == Run.Status.RUNNING:
            advance_run_on_commit(run.pk)
