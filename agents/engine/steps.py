"""One path for a step's life, model or tool: claim it under a lease, give it back (a retry or
a deferral), record how it ended, and take it over when its worker was lost.

Every write is a conditional UPDATE on what the caller read (status, attempts), made inside the
caller's transaction under the run's lock, so a late or duplicate worker changes nothing: it
finds its claim gone and returns. No lock is held across a model or tool call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from agents.models import Run, Step
from audittrail import writer as audit
from audittrail.actions import AuditAction


def now() -> datetime:
    return timezone.now()


def backoff_seconds(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter (half fixed, half random), at least ``retry_after``."""
    cap = float(settings.AGENTSITE_RETRY_BACKOFF_MAX)
    ceiling = min(cap, settings.AGENTSITE_RETRY_BACKOFF_BASE * 2 ** max(0, attempt - 1))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        # A server's Retry-After is honoured up to its own, larger cap; the wait is kept in
        # Postgres (not_before), so the reconciler resumes it even if the message is lost.
        return min(max(delay, retry_after), float(settings.AGENTSITE_RETRY_AFTER_MAX))
    return min(delay, cap)


def countdown(delay: float) -> float | None:
    """The countdown of the message that retries after ``delay`` seconds, or None: a wait
    longer than AGENTSITE_MAX_COUNTDOWN is kept in Postgres only (``not_before``) and the
    reconciler nudges the run once it is due, since Redis redelivers a message held past its
    visibility timeout."""
    return delay if delay <= settings.AGENTSITE_MAX_COUNTDOWN else None


def lease_expired(step: Step, at: datetime | None = None) -> bool:
    return step.lease_expires_at is None or step.lease_expires_at <= (at or now())


def not_yet(step: Step, at: datetime | None = None) -> bool:
    """True while a step must be left alone by this caller: a live worker holds it (running,
    lease not expired), or it is backing off (pending, not before a time still to come)."""
    at = at or now()
    if step.status == Step.Status.RUNNING:
        return not lease_expired(step, at)
    return step.not_before is not None and step.not_before > at


def lost_for_good(step: Step, max_attempts: int) -> bool:
    """The step's worker was lost (running, lease expired) on the last attempt allowed."""
    return step.status == Step.Status.RUNNING and step.attempts >= max_attempts


def fail_lost(step: Step) -> None:
    """End a step whose worker was lost on its last attempt: stop, rather than repeat a side
    effect or a paid call forever. The caller says what follows (the run fails, or the model
    reads the failure)."""
    Step.objects.filter(pk=step.pk, status=Step.Status.RUNNING).update(
        status=Step.Status.FAILED,
        error=f"the worker performing attempt {step.attempts} (the last allowed) was lost",
        finished_at=now(),
        lease_expires_at=None,
    )


def claim(step: Step, *, lease_seconds: float) -> bool:
    """Take ``step`` (pending, or running with its lease expired) for one attempt: running,
    ``attempts`` + 1, leased for ``lease_seconds``. Conditional on the status and attempts the
    caller read; on success ``step`` holds what was written (no read back)."""
    at = now()
    lease = at + timedelta(seconds=lease_seconds)
    claimed = Step.objects.filter(pk=step.pk, status=step.status, attempts=step.attempts).update(
        status=Step.Status.RUNNING,
        attempts=F("attempts") + 1,
        lease_expires_at=lease,
        not_before=None,
        started_at=at,
    )
    if claimed:
        step.status, step.attempts, step.started_at = Step.Status.RUNNING, step.attempts + 1, at
        step.not_before, step.lease_expires_at = None, lease
    return bool(claimed)


def create_running(run: Run, *, lease_seconds: float, **fields: Any) -> Step:
    """A new step, claimed for its first attempt by the caller."""
    at = now()
    return Step.objects.create(
        run=run,
        status=Step.Status.RUNNING,
        attempts=1,
        lease_expires_at=at + timedelta(seconds=lease_seconds),
        started_at=at,
        **fields,
    )


def _ours(step: Step) -> Any:
    """The step as long as our claim holds: still running, on the attempt we made."""
    return Step.objects.filter(pk=step.pk, status=Step.Status.RUNNING, attempts=step.attempts)


def finish(step: Step, status: str, **fields: Any) -> bool:
    """Record how the claimed attempt ended (succeeded, failed, refused, cancelled). False if
    the claim was lost meanwhile (taken over, or the run ended): nothing is written then."""
    return bool(
        _ours(step).update(status=status, finished_at=now(), lease_expires_at=None, **fields)
    )


def give_back(step: Step, *, delay: float, refund: bool = False, **fields: Any) -> bool:
    """Return the claimed step to pending, not before ``delay`` seconds from now (none: at
    once). ``refund`` gives its attempt back (a deferral spends none)."""
    if refund:
        fields["attempts"] = F("attempts") - 1
    return bool(
        _ours(step).update(
            status=Step.Status.PENDING,
            lease_expires_at=None,
            not_before=now() + timedelta(seconds=delay) if delay else None,
            **fields,
        )
    )


def cancel_running(step: Step, **fields: Any) -> None:
    """The run ended while the step was performed: its result is not recorded."""
    Step.objects.filter(pk=step.pk, status=Step.Status.RUNNING).update(
        status=Step.Status.CANCELLED, lease_expires_at=None, **fields
    )


def touch(run: Run) -> None:
    """The run moved (the reconciler leaves it alone for AGENTSITE_STALLED_AFTER)."""
    Run.objects.filter(pk=run.pk).update(updated_at=now())


def schedule_retry(
    run: Run,
    step: Step,
    *,
    delay: float,
    payload: dict[str, Any],
    action: str = AuditAction.STEP_RETRY_SCHEDULED,
    refund: bool = False,
    **fields: Any,
) -> bool:
    """Give the claimed step back to be tried again after ``delay`` seconds (a failed attempt
    retried, a fallback to another route, a deferral), audit why, and mark the run as moving.
    Under the run's lock. False if the claim was lost meanwhile."""
    if not give_back(step, delay=delay, refund=refund, **fields):
        return False
    audit.record(action, run=run, step_index=step.index, payload=payload)
    touch(run)
    return True


@dataclass
class Outcome:
    """What the task should do next: nothing, or send itself again after ``retry_in`` seconds
    (a tool call's message carries its ``timeout``)."""

    retry_in: float | None = None
    timeout: int = 30


def cancel_pending(step: Step) -> None:
    """The run ended before the step was taken: it never runs."""
    Step.objects.filter(pk=step.pk, status=Step.Status.PENDING).update(
        status=Step.Status.CANCELLED, finished_at=now()
    )
