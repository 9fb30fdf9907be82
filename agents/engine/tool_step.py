"""Executing tool calls: claim the step, run the tool outside any transaction, record the result.

A tool call is its own Celery task. The step is claimed with a conditional UPDATE so concurrent
or redelivered tasks run it at most once at a time; the tool receives an idempotency key that is
the same on every attempt, so an external side effect can be made to happen at most once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, transaction
from django.utils import timezone

from agents.dispatch import advance_run_on_commit
from agents.jsonsafe import json_safe
from agents.models import Run, Step
from agentsite import breaker, tracing
from agentsite.pools import release_connection, ride_out_outage, soft_time_limit
from approvals.models import Approval, action_digest
from audittrail import writer as audit
from audittrail.actions import AuditAction
from tools import policy
from tools.registry import ToolContext, ToolError, ToolSpec, TransientToolError, registry

from . import steps, transitions
from .requests import ToolStepRequest
from .steps import Outcome, backoff_seconds, countdown

logger = logging.getLogger(__name__)


def claim(run_id: UUID | str, step_index: int) -> Step | None:
    """Take the tool step for one attempt, or None when it is not this caller's to perform:
    done, held for a reviewer, backing off, held by a live worker, or its run ended."""
    with transaction.atomic(), audit.batched():
        # The step with its run and version in one statement, locking the step's and the run's
        # rows (not the agent version every run shares). Both: after waiting for a lock,
        # Postgres re-reads only the rows it locks, and the step must be read as it is now.
        step = (
            Step.objects.select_for_update(of=("self", "run"))
            .select_related("run__agent_version")
            .filter(run_id=run_id, index=step_index, kind=Step.Kind.TOOL)
            .first()
        )
        if step is None or step.status not in (Step.Status.PENDING, Step.Status.RUNNING):
            return None  # done, or held for a reviewer: a stray message must not run it
        run = step.run
        if run.is_final:
            steps.cancel_pending(step)
            return None
        if run.status not in (Run.Status.RUNNING, Run.Status.WAITING_APPROVAL):
            return None  # queued (cannot happen for a tool step) or final
        if steps.not_yet(step):
            return None  # backing off (the delayed task comes back), or a live worker has it
        if steps.lost_for_good(step, _max_attempts(step.tool_name)):
            # Its worker died (killed, or over the hard time limit) on every attempt: stop
            # rather than repeat a side effect forever, and let the model read the failure.
            steps.fail_lost(step)
            audit.record(
                AuditAction.TOOL_CALL_FAILED,
                run=run,
                step_index=step.index,
                payload={
                    "tool": step.tool_name,
                    "error": "worker lost on the last attempt allowed",
                    "error_type": "worker_lost",
                },
            )
            advance_run_on_commit(run.pk)
            return None
        if not steps.claim(step, lease_seconds=_lease_seconds(step.tool_name)):
            return None
        if step.attempts > 1:
            audit.record(
                AuditAction.TOOL_CALL_ATTEMPT,
                run=run,
                step_index=step.index,
                payload={"tool": step.tool_name, "attempt": step.attempts},
            )
        return step


def _hard_limit(tool_name: str) -> int:
    """The call's hard time limit: the tool's timeout plus the grace (agents.dispatch)."""
    spec = registry.get(tool_name)
    return (spec.timeout if spec else 30) + settings.AGENTSITE_TOOL_HARD_LIMIT_GRACE


def _lease_seconds(tool_name: str) -> int:
    """Past the call's hard time limit and a margin, its worker is dead."""
    return _hard_limit(tool_name) + settings.AGENTSITE_TOOL_LEASE_MARGIN


def _max_attempts(tool_name: str) -> int:
    spec = registry.get(tool_name)
    return max(settings.AGENTSITE_STEP_MAX_ATTEMPTS, spec.retries + 1 if spec else 1)


def _jsonable(value: Any) -> Any:
    # allow_nan=False: Postgres jsonb refuses NaN and Infinity, so such a result is a tool error.
    return json_safe(json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False)))


def execute_tool_call(*, run_id: UUID | str, step_index: int) -> Outcome:
    """Perform one tool step of a run, at most once at a time, and nudge the run when done.

    The call is authorised again here (a grant revoked or a tool disabled since the model asked
    is refused now), an approved call runs only with exactly the approved arguments, and the
    tool's circuit breaker may short-circuit it. Transient failures (TransientToolError,
    timeouts, connection errors) are retried with backoff up to the tool's ``retries``; other
    failures are reported to the model.
    """
    step = claim(run_id, step_index)
    if step is None:
        return Outcome()
    attributes = {
        "agentsite.step.kind": "tool",
        "agentsite.step.attempt": step.attempts,
        "agentsite.tool": step.tool_name,
    }
    with tracing.run_span(step.run, "agent.step", step=step.index, attributes=attributes):
        return _tool_step(step)


def _tool_step(step: Step) -> Outcome:
    """Authorise the claimed call again, run the tool, and record what came of it."""
    spec = registry.get(step.tool_name)
    if spec is None:
        _record(
            step,
            error=f"tool {step.tool_name!r} is no longer installed",
            latency_ms=None,
            error_type="not_installed",
        )
        return Outcome()
    arguments = ToolStepRequest.of(step).arguments
    verdict = _authorised(step, spec, arguments)
    if verdict is None:
        return Outcome()
    ctx = ToolContext(
        run_id=str(step.run_id),
        step_index=step.index,
        idempotency_key=step.idempotency_key,
        attempt=step.attempts,
        tool=spec.name,
        constraints=verdict.constraint_sets[-1],
        constraint_sets=verdict.constraint_sets,
    )
    started = time.monotonic()
    try:
        args = spec.validate(arguments)
        release_connection()  # a tool that needs the database takes a connection again
        with (
            tracing.span("tool.call", attributes={"agentsite.tool": spec.name}),
            soft_time_limit(spec.timeout, f"tool {spec.name}"),
        ):
            result = _jsonable(spec.func(args, ctx))
    except (
        TransientToolError,
        SoftTimeLimitExceeded,
        TimeoutError,
        ConnectionError,
        DatabaseError,
    ) as exc:
        transient: Exception = exc
    except ToolError as exc:
        breaker.record_success(spec.name)  # it answered; the model's request was at fault
        _record(step, error=str(exc), latency_ms=_ms(started), error_type="tool_error")
        return Outcome()
    except Exception as exc:
        breaker.record_failure(spec.name)
        logger.exception("tool %s crashed in run %s step %s", spec.name, step.run_id, step.index)
        _record(
            step,
            error=f"the tool crashed: {type(exc).__name__}: {exc}",
            latency_ms=_ms(started),
            error_type="crash",
        )
        return Outcome()
    else:
        breaker.record_success(spec.name)
        _record(step, result=result, latency_ms=_ms(started))
        return Outcome()

    breaker.record_failure(spec.name)
    return _retry_or_give_up(step, spec, transient, started)


def _authorised(step: Step, spec: ToolSpec, arguments: Any) -> policy.Authorization | None:
    """The call's verdict if it may run now; None when it may not (what stopped it is
    recorded: a refusal, a missing or different approval, an open circuit)."""
    verdict = policy.authorize(step.run, spec.name, arguments, step_index=step.index)
    if verdict.refusal:
        _record(step, error=verdict.refusal, latency_ms=None, refused=True)
        return None
    if verdict.mode == "require_approval":
        problem = _check_approval(step, arguments)
        if problem:
            _record(step, error=problem, latency_ms=None, refused=True, error_type="not_approved")
            return None
    state = breaker.before_call(spec.name)
    if not state.allowed:
        _record(
            step,
            error=policy.unavailable_message(spec.name, state.retry_in),
            latency_ms=None,
            audit_action=AuditAction.TOOL_CALL_SHORT_CIRCUITED,
        )
        return None
    return verdict


def _retry_or_give_up(step: Step, spec: ToolSpec, transient: Exception, started: float) -> Outcome:
    """A transient failure: try again after a backoff while the tool's retries last."""
    reason = (
        f"timed out after {spec.timeout}s"
        if isinstance(transient, SoftTimeLimitExceeded)
        else f"{type(transient).__name__}: {transient}"
    )
    if step.attempts <= spec.retries:
        delay = backoff_seconds(step.attempts)
        with transaction.atomic(), audit.batched():
            locked = transitions.lock_run(step.run_id)
            released = locked is not None and steps.schedule_retry(
                locked,
                step,
                delay=delay,
                error=json_safe(reason),
                payload={
                    "tool": spec.name,
                    "attempt": step.attempts,
                    "error": reason,
                    "retry_in": round(delay, 2),
                },
            )
        return Outcome(retry_in=countdown(delay) if released else None, timeout=spec.timeout)
    timed_out = isinstance(transient, SoftTimeLimitExceeded | TimeoutError)
    _record(
        step,
        error=f"gave up after {step.attempts} attempts: {reason}",
        latency_ms=_ms(started),
        error_type="timeout" if timed_out else "transient",
    )
    return Outcome()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _check_approval(step: Step, arguments: Any) -> str:
    """Why an approval-gated call may not run now, or "" when it may: it must carry an approved
    approval whose digest matches exactly what is about to run, consumed by this step only."""
    approval_id = ToolStepRequest.of(step).approval
    approval = (
        Approval.objects.filter(pk=approval_id, run_id=step.run_id).first() if approval_id else None
    )
    if approval is None or approval.status != Approval.Status.APPROVED:
        return f"tool {step.tool_name!r} needs a reviewer's approval, and this call has none"
    if approval.step_index != step.index or approval.approved_digest != action_digest(
        step.tool_name, arguments
    ):
        return "the arguments differ from what the reviewer approved; the call was not run"
    Approval.objects.filter(pk=approval.pk, consumed_at__isnull=True).update(
        consumed_at=timezone.now()
    )
    return ""


def _record(
    step: Step,
    *,
    result: Any = None,
    error: str = "",
    latency_ms: int | None,
    refused: bool = False,
    audit_action: str = "",
    error_type: str = "",
) -> None:
    """Record the call's outcome (riding out a database outage: the tool has acted).
    ``latency_ms`` is None for a call that never ran (refused, short-circuited...)."""
    ride_out_outage(
        lambda: _record_once(
            step,
            result=result,
            error=error,
            latency_ms=latency_ms,
            refused=refused,
            audit_action=audit_action,
            error_type=error_type,
        ),
        f"recording tool step {step.index} of run {step.run_id}",
        # What is left of the call's hard time limit (timeout + grace) after the tool ran.
        within=_hard_limit(step.tool_name) - (latency_ms or 0) / 1000 - 2,
    )


def _record_once(
    step: Step,
    *,
    result: Any,
    error: str,
    latency_ms: int | None,
    refused: bool,
    audit_action: str,
    error_type: str = "",
) -> None:
    with transaction.atomic(), audit.batched():
        # Only what is read here: the run's input and result can be large JSON.
        run = transitions.lock_run(
            step.run_id, only=("status", "trace_id", "agent_id", "updated_at")
        )
        if run is None:
            return
        if refused:
            status = Step.Status.REFUSED
        else:
            status = Step.Status.FAILED if error else Step.Status.SUCCEEDED
        if run.is_final:
            status = Step.Status.CANCELLED
        recorded = steps.finish(
            step, status, response=result, error=json_safe(error), latency_ms=latency_ms
        )
        if not recorded:
            return
        transitions.mark_progress(run)
        outcome = "refused" if refused else "failed" if error else "succeeded"
        logger.info(
            "tool step %s: %s %s%s",
            step.index,
            step.tool_name,
            outcome,
            "" if latency_ms is None else f" in {latency_ms} ms",
            extra={
                "data": {
                    "tool": step.tool_name,
                    "outcome": outcome,
                    "latency_ms": latency_ms,
                    **({"error_type": error_type} if error_type else {}),
                }
            },
        )
        audit.record(
            audit_action or AuditAction.tool_call_ended(outcome),
            run=run,
            step_index=step.index,
            payload={
                "tool": step.tool_name,
                "error": error,
                "latency_ms": latency_ms,
                **({"error_type": error_type} if error_type else {}),
            }
            if error
            else {"tool": step.tool_name, "latency_ms": latency_ms},
        )
        if run.status == Run.Status.RUNNING:
            advance_run_on_commit(run.pk)
