"""A run's transitions: lock it, move it from one status to another, finish it, hold it for a
reviewer, resume it, reopen it. The only code that changes a Run's status, and (with
``steps``) a Step's.

Each transition is a conditional UPDATE (``status IN (...)``) made under the run's lock, with
its audit event in the same transaction: two workers, or a worker and a reviewer, can never
both move one run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import F

from agents.dispatch import advance_run_on_commit, webhook_on_commit
from agents.errorcodes import RunErrorCode
from agents.jsonsafe import json_safe
from agents.models import Run, Session, Step
from approvals import escalation
from audittrail import writer as audit
from audittrail.actions import AuditAction

from .requests import ModelStepRequest, ToolStepRequest
from .steps import now


def lock_run(
    run_id: UUID | str, *, related: Iterable[str] = (), only: Iterable[str] = ()
) -> Run | None:
    """The run, locked for the rest of the transaction (None if there is no such run).

    ``of=("self",)``: the run's row only, not the agent version every run of the agent shares
    (that made submissions wait on workers, and deadlock)."""
    query = Run.objects.select_for_update(of=("self",))
    if related:
        query = query.select_related(*related)
    if only:
        query = query.only(*only)
    return query.filter(pk=run_id).first()


def lock_session(run: Run) -> None:
    """Serialise the runs of ``run``'s session (a successor checks whether we are done)."""
    if run.session_id is not None:
        Session.objects.select_for_update(no_key=True).filter(pk=run.session_id).first()


def transition(
    run: Run,
    *,
    from_statuses: tuple[str, ...],
    to: str,
    action: str,
    by: audit.Actor = audit.ENGINE,
    payload: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move ``run`` to ``to`` if it is in one of ``from_statuses``; audit it in the same
    transaction. Returns False (and changes nothing) if another worker got there first."""
    at = now()
    changed = Run.objects.filter(pk=run.pk, status__in=from_statuses).update(
        status=to, updated_at=at, **fields
    )
    if not changed:
        return False
    run.status = to
    run.updated_at = at
    for name, value in fields.items():
        setattr(run, name, value)
    audit.record(action, run=run, payload=payload, by=by)
    return True


def start(run: Run) -> bool:
    return transition(
        run,
        from_statuses=(Run.Status.QUEUED,),
        to=Run.Status.RUNNING,
        action=AuditAction.RUN_STARTED,
        started_at=now(),
    )


def finish_run(
    run: Run,
    status: str,
    *,
    result: Any = None,
    error_code: str = "",
    error: str = "",
    by: audit.Actor = audit.ENGINE,
    open_steps: bool = True,
) -> bool:
    """End a run (succeeded, failed or cancelled), stop its pending steps and let the next run
    of its session start. Call inside a transaction holding the run's lock.

    ``open_steps=False`` says the caller knows no step is pending or running (the model's final
    answer was just recorded, after every earlier step had finished), sparing a statement."""
    was_waiting = run.status == Run.Status.WAITING_APPROVAL
    done = transition(
        run,
        from_statuses=Run.ACTIVE_STATUSES,
        to=status,
        action=AuditAction.run_finished(status),
        by=by,
        payload={"error_code": error_code, "error": error} if error else {},
        result=result,
        error_code=error_code,
        error=error,
        finished_at=now(),
    )
    if not done:
        return False
    if open_steps:
        # A step still running finishes on its worker, but its result will not be recorded.
        Step.objects.filter(
            run=run,
            status__in=(Step.Status.PENDING, Step.Status.RUNNING, Step.Status.AWAITING_APPROVAL),
        ).update(status=Step.Status.CANCELLED, finished_at=now(), lease_expires_at=None)
    if was_waiting:
        # Approvals are pending only while the run waits (it resumes when none is left).
        escalation.cancel_pending_approvals(run, by=by)
    if run.webhook_url:
        Run.objects.filter(pk=run.pk).update(webhook_status="pending")
        webhook_on_commit(run.pk)
    if run.session_id is not None:
        # Under the session's lock, so a successor that checked us while we were still running
        # has committed and is seen here (see model_step.plan).
        lock_session(run)
        successor = (
            Run.objects.filter(session_id=run.session_id, status=Run.Status.QUEUED)
            .order_by("created_at")
            .values_list("pk", flat=True)
            .first()
        )
        if successor is not None:
            advance_run_on_commit(successor)
    return True


def fail(run: Run, code: str, message: str) -> None:
    finish_run(run, Run.Status.FAILED, error_code=code, error=message)


def reopen_failed_run(run: Run, *, step: Step, by: audit.Actor) -> bool:
    """A failed run goes back to running from ``step`` (its failed model step, which gets fresh
    attempts); the error it had is kept in the audit event. Under the run's lock."""
    previous = {"error_code": run.error_code, "error": run.error, "step_index": step.index}
    # Fresh attempts on every route: what failed before (maybe a provider now fixed) is forgotten.
    request = ModelStepRequest.of(step).fresh()
    Step.objects.filter(pk=step.pk).update(
        status=Step.Status.PENDING,
        request=request.to_json(),
        attempts=0,
        error="",
        not_before=None,
        lease_expires_at=None,
        started_at=None,
        finished_at=None,
    )
    reopened = transition(
        run,
        from_statuses=(Run.Status.FAILED,),
        to=Run.Status.RUNNING,
        action=AuditAction.RUN_RETRIED,
        by=by,
        payload=previous,
        error_code="",
        error="",
        result=None,
        finished_at=None,
    )
    if reopened:
        advance_run_on_commit(run.pk)
    return reopened


def fail_after_crash(run_id: UUID | str, *, task: str, exc: BaseException) -> bool:
    """End a run whose task failed for good on something that is neither a provider, a tool
    nor the database (a bug, or data the engine cannot handle): a poison message. Retrying it
    would fail the same way, and the reconciler would nudge it forever. Returns True if the
    run was active and is now failed."""
    message = json_safe(f"{task} failed: {type(exc).__name__}: {exc}")[:2000]
    with transaction.atomic(), audit.batched():
        run = lock_run(run_id)
        if run is None or run.is_final:
            return False
        return finish_run(
            run,
            Run.Status.FAILED,
            error_code=RunErrorCode.INTERNAL_ERROR,
            error=message,
            by=audit.Actor.system("worker"),
        )


def mark_progress(run: Run) -> None:
    """Tell the reconciler the run is moving (it nudges runs whose ``updated_at`` is older than
    AGENTSITE_STALLED_AFTER). Under the run's lock, with ``updated_at`` loaded: a run touched
    in the last quarter of that span is left alone, sparing a statement on most steps."""
    at = now()
    if run.updated_at is not None and (
        (at - run.updated_at).total_seconds() < settings.AGENTSITE_STALLED_AFTER / 4
    ):
        return
    Run.objects.filter(pk=run.pk).update(updated_at=at)
    run.updated_at = at


# --- Review ----------------------------------------------------------------------------------


def hold_for_review(run: Run, **what: Any) -> None:
    """Ask a reviewer about the run's answer or budget (``approvals.escalation.escalate``'s
    arguments) and wait for the decision."""
    escalation.escalate(run, **what)
    wait_for_review(run, payload={"reason": what["reason"]})


def wait_for_review(run: Run, *, payload: dict[str, Any]) -> bool:
    return transition(
        run,
        from_statuses=(Run.Status.RUNNING,),
        to=Run.Status.WAITING_APPROVAL,
        action=AuditAction.RUN_WAITING_APPROVAL,
        payload=payload,
    )


def resume_after_review(run: Run, *, by: audit.Actor) -> bool:
    """A run whose held calls are all decided goes back to running, and on a worker. Under the
    run's lock; a no-op while something is still held."""
    held = Step.objects.filter(run=run, status=Step.Status.AWAITING_APPROVAL).exists()
    if held or escalation.has_pending(run):
        return False
    resumed = transition(
        run,
        from_statuses=(Run.Status.WAITING_APPROVAL,),
        to=Run.Status.RUNNING,
        action=AuditAction.RUN_RESUMED,
        by=by,
    )
    if resumed:
        advance_run_on_commit(run.pk)  # a no-op while approved calls are still running
    return resumed


def refuse_held_call(step: Step, *, error: str) -> None:
    """A reviewer rejected the held tool call: the model reads why."""
    Step.objects.filter(pk=step.pk).update(
        status=Step.Status.REFUSED, error=error, finished_at=now()
    )


def release_held_call(step: Step, request: ToolStepRequest) -> None:
    """A reviewer approved the held tool call (with these arguments): it runs on a worker.
    ``step.request`` is read back as stored (jsonb may normalise numbers)."""
    Step.objects.filter(pk=step.pk).update(status=Step.Status.PENDING, request=request.to_json())
    step.refresh_from_db(fields=["request"])


def answer_held_call(step: Step, reply: dict[str, Any]) -> None:
    """A reviewer answered the model's escalate_to_human call: the reply is its result."""
    Step.objects.filter(pk=step.pk).update(
        status=Step.Status.SUCCEEDED, response=reply, finished_at=now()
    )


def charge(run: Run, *, input_tokens: int, output_tokens: int, cost: Any) -> None:
    """Add a model call's usage and cost to the run's totals (under the run's lock: the row's
    totals are what was read, plus this)."""
    Run.objects.filter(pk=run.pk).update(
        input_tokens=F("input_tokens") + input_tokens,
        output_tokens=F("output_tokens") + output_tokens,
        cost=F("cost") + (cost or 0),
        updated_at=now(),
    )
    run.input_tokens += input_tokens
    run.output_tokens += output_tokens
    run.cost += cost or 0
