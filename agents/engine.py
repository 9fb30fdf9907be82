"""The run engine: a state machine in Postgres, advanced one step per Celery task.

Every state change is a conditional UPDATE (or happens under ``select_for_update`` on the run)
and writes its audit event in the same transaction, so two workers can never both advance one
run. No lock is held across a model or tool call: a step is *claimed* (status ``running``,
``attempts`` + 1, a lease) in one short transaction, performed outside any transaction, and its
result recorded in another, conditional on the claim still being ours.

Redelivered or duplicate nudges are harmless: a step already done is never redone, a step being
done by a live worker (unexpired lease) is left alone, and a step whose worker died (lease
expired) is taken over.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import F
from django.utils import timezone
from opentelemetry.trace import SpanKind

from agentsite import tracing
from agentsite.pools import release_connection, ride_out_outage, soft_time_limit
from tools import policy

from . import audit, governance, limits
from .dispatch import advance_run_on_commit, tool_call_on_commit, webhook_on_commit
from .jsonsafe import count, json_safe
from .models import Run, Session, Step
from .outputs import loads_strict
from .providers import (
    InvalidProviderResponse,
    ModelProvider,
    ModelRequest,
    ModelResponse,
    PermanentProviderError,
    ProviderError,
    RateLimitedProviderError,
    ToolCallRequest,
    TransientProviderError,
    resolve_route,
)

logger = logging.getLogger(__name__)

SESSION_HISTORY_RUNS = 20
# A step the provider answers 429, or whose every route's circuit is open, is put off this many
# times without spending an attempt; after that it counts as a failed attempt, so a provider
# that never relents fails the run.
MAX_THROTTLED = 20
# A provider's 429 holds every worker back for its Retry-After, up to this; the step itself
# waits the whole Retry-After (up to AGENTSITE_RETRY_AFTER_MAX).
PROVIDER_PAUSE_MAX = 300.0
# The built-in tool a model calls to ask a human; it is always held for a reviewer.
ESCALATE_TOOL = "escalate_to_human"


def _now() -> Any:
    return timezone.now()


def _lease() -> Any:
    return _now() + timedelta(seconds=settings.AGENTSITE_STEP_LEASE_SECONDS)


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


# --- Transitions ------------------------------------------------------------------------------


def _transition(
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
    now = _now()
    changed = Run.objects.filter(pk=run.pk, status__in=from_statuses).update(
        status=to, updated_at=now, **fields
    )
    if not changed:
        return False
    run.status = to
    run.updated_at = now
    for name, value in fields.items():
        setattr(run, name, value)
    audit.record(action, run=run, payload=payload, by=by)
    return True


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
    done = _transition(
        run,
        from_statuses=Run.ACTIVE_STATUSES,
        to=status,
        action=f"run.{status}",
        by=by,
        payload={"error_code": error_code, "error": error} if error else {},
        result=result,
        error_code=error_code,
        error=error,
        finished_at=_now(),
    )
    if not done:
        return False
    if open_steps:
        # A step still running finishes on its worker, but its result will not be recorded.
        Step.objects.filter(
            run=run,
            status__in=(Step.Status.PENDING, Step.Status.RUNNING, Step.Status.AWAITING_APPROVAL),
        ).update(status=Step.Status.CANCELLED, finished_at=_now(), lease_expires_at=None)
    if was_waiting:
        # Approvals are pending only while the run waits (it resumes when none is left).
        from approvals.services import cancel_pending_approvals

        cancel_pending_approvals(run, by=by)
    if run.webhook_url:
        Run.objects.filter(pk=run.pk).update(webhook_status="pending")
        webhook_on_commit(run.pk)
    if run.session_id is not None:
        # Under the session's lock, so a successor that checked us while we were still running
        # has committed and is seen here (see _plan).
        Session.objects.select_for_update(no_key=True).filter(pk=run.session_id).first()
        successor = (
            Run.objects.filter(session_id=run.session_id, status=Run.Status.QUEUED)
            .order_by("created_at")
            .values_list("pk", flat=True)
            .first()
        )
        if successor is not None:
            advance_run_on_commit(successor)
    return True


def reopen_failed_run(run: Run, *, step: Step, by: audit.Actor) -> bool:
    """A failed run goes back to running from ``step`` (its failed model step, which gets fresh
    attempts); the error it had is kept in the audit event. Under the run's lock."""
    previous = {"error_code": run.error_code, "error": run.error, "step_index": step.index}
    # Fresh attempts on every route: what failed before (maybe a provider now fixed) is forgotten.
    request = {
        k: v for k, v in (step.request or {}).items() if k not in ("route_failures", "throttled")
    }
    Step.objects.filter(pk=step.pk).update(
        status=Step.Status.PENDING,
        request=request,
        attempts=0,
        error="",
        not_before=None,
        lease_expires_at=None,
        started_at=None,
        finished_at=None,
    )
    reopened = _transition(
        run,
        from_statuses=(Run.Status.FAILED,),
        to=Run.Status.RUNNING,
        action="run.retried",
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
        run = Run.objects.select_for_update(of=("self",)).filter(pk=run_id).first()
        if run is None or run.is_final:
            return False
        return finish_run(
            run,
            Run.Status.FAILED,
            error_code="internal_error",
            error=message,
            by=audit.Actor.system("worker"),
        )


def resume_after_review(run: Run, *, by: audit.Actor) -> bool:
    """A run whose held calls are all decided goes back to running. Under the run's lock."""
    return _transition(
        run,
        from_statuses=(Run.Status.WAITING_APPROVAL,),
        to=Run.Status.RUNNING,
        action="run.resumed",
        by=by,
    )


def mark_progress(run: Run) -> None:
    """Tell the reconciler the run is moving (it nudges runs whose ``updated_at`` is older than
    AGENTSITE_STALLED_AFTER). Under the run's lock, with ``updated_at`` loaded: a run touched
    in the last quarter of that span is left alone, sparing a statement on most steps."""
    now = _now()
    fresh = timedelta(seconds=settings.AGENTSITE_STALLED_AFTER / 4)
    if run.updated_at is not None and now - run.updated_at < fresh:
        return
    Run.objects.filter(pk=run.pk).update(updated_at=now)
    run.updated_at = now


def _fail(run: Run, code: str, message: str) -> None:
    finish_run(run, Run.Status.FAILED, error_code=code, error=message)


# --- Building the conversation ----------------------------------------------------------------


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _tool_message(step: Step) -> dict[str, Any]:
    if step.status == Step.Status.SUCCEEDED:
        content = _as_text(step.response)
    elif step.status == Step.Status.REFUSED:
        content = f"Refused: {step.error}"
    else:
        content = f"Error: {step.error or step.status}"
    limit = settings.AGENTSITE_MAX_TOOL_RESULT_CHARS
    if len(content) > limit:
        content = content[:limit] + f"… [truncated, {len(content)} characters in all]"
    return {"role": "tool", "tool_call_id": step.tool_call_id, "content": content}


def _model_message(step: Step) -> dict[str, Any]:
    data = step.response or {}
    message: dict[str, Any] = {"role": "assistant", "content": data.get("text")}
    if data.get("tool_calls"):
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": call["arguments"]
                    if isinstance(call["arguments"], str)
                    else json.dumps(call["arguments"], sort_keys=True),
                },
            }
            for call in data["tool_calls"]
        ]
    return message


def _answer_instructions(version: Any) -> str:
    """What the model is told about the form of its final answer (schema, confidence)."""
    parts = []
    if version.output_schema:
        parts.append(
            "Your final answer must be only JSON matching this JSON Schema: "
            + json.dumps(version.output_schema, sort_keys=True)
        )
    if version.policy.get("min_confidence") is not None:
        parts.append(
            "With your final answer, say how sure you are: "
            + (
                'include a "confidence" property (0 to 1) in it.'
                if version.output_schema
                else 'answer with only a JSON object {"answer": <your answer>, "confidence": '
                "<0 to 1>}."
            )
        )
    return "\n".join(parts)


def build_messages(run: Run, steps: list[Step]) -> list[dict[str, Any]]:
    """The conversation the model sees: system prompt, the session's earlier turns, the input,
    then every model turn of this run followed by its tool results."""
    version = run.agent_version
    messages: list[dict[str, Any]] = []
    system = "\n\n".join(p for p in (version.system_prompt, _answer_instructions(version)) if p)
    if system:
        messages.append({"role": "system", "content": system})
    if run.session_id is not None:
        earlier = list(
            Run.objects.filter(
                session_id=run.session_id,
                status=Run.Status.SUCCEEDED,
                created_at__lt=run.created_at,
            )
            .order_by("-created_at")
            .values_list("input", "result")[:SESSION_HISTORY_RUNS]
        )
        for past_input, past_result in reversed(earlier):
            messages.append({"role": "user", "content": _as_text(past_input)})
            messages.append({"role": "assistant", "content": _as_text(past_result)})
    messages.append({"role": "user", "content": _as_text(run.input)})
    for step in steps:
        if step.kind == Step.Kind.MODEL and step.status == Step.Status.SUCCEEDED:
            messages.append(_model_message(step))
            problem = (step.response or {}).get("output_errors")
            if problem:
                messages.append(
                    {
                        "role": "user",
                        "name": "agentsite",
                        "content": f"Your answer does not match the required output schema: "
                        f"{problem}. Answer again with only JSON that matches the schema.",
                    }
                )
            messages.extend(
                _tool_message(s)
                for s in steps
                if s.kind == Step.Kind.TOOL and s.parent_index == step.index
            )
    return messages


# --- Advancing a run --------------------------------------------------------------------------


@dataclass
class ModelStepPlan:
    run: Run
    step: Step
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    estimate: int  # the call's input tokens, roughly (for rate limits)


@dataclass
class Outcome:
    """What the task should do next: nothing, or nudge the run again after ``retry_in``."""

    retry_in: float | None = None


def _lease_expired(step: Step) -> bool:
    return step.lease_expires_at is None or step.lease_expires_at <= _now()


def blocked_by_session(run: Run) -> bool:
    return (
        run.session_id is not None
        and Run.objects.filter(
            session_id=run.session_id,
            status__in=Run.ACTIVE_STATUSES,
            created_at__lt=run.created_at,
        ).exists()
    )


def _allowance(run: Run) -> int:
    """Budgets the run has: 1, plus one per budget escalation a reviewer approved."""
    if run.agent_version.policy.get("on_budget_exhausted") != "escalate":
        return 1
    from approvals.services import budget_allowance

    return budget_allowance(run)


def _step_limit(run: Run) -> int:
    return governance.Budget.of(run, _allowance(run)).max_steps


def _budget_exhausted(run: Run, last: Step | None, message: str) -> None:
    """Fail the run, or, if the agent's policy says ``on_budget_exhausted: escalate``, ask a
    reviewer for another budget."""
    from approvals.models import Approval

    if run.agent_version.policy.get("on_budget_exhausted") != "escalate":
        _fail(run, "budget_exceeded", message)
        return
    index = last.index if last is not None else 0
    if Approval.objects.filter(run=run, step_index=index, reason="budget_exhausted").exists():
        _fail(run, "budget_exceeded", message)  # already extended at this very step
        return
    _hold_for_review(run, step_index=index, reason=Approval.Reason.BUDGET_EXHAUSTED, detail=message)


def _stored_response(step: Step) -> ModelResponse:
    data = step.response or {}
    return ModelResponse(
        text=data.get("text"),
        tool_calls=[
            ToolCallRequest(
                id=c.get("id", ""),
                name=c.get("name", ""),
                arguments=c.get("arguments"),
                arguments_error=c.get("arguments_error", ""),
            )
            for c in data.get("tool_calls") or []
        ],
        input_tokens=0,
        output_tokens=0,
    )


def _refused_turns_in_a_row(steps: list[Step]) -> int:
    count = 0
    for model_step in reversed([s for s in steps if s.kind == Step.Kind.MODEL]):
        calls = [s for s in steps if s.parent_index == model_step.index]
        if calls and all(s.status == Step.Status.REFUSED for s in calls):
            count += 1
        else:
            break
    return count


def _plan(run_id: UUID | str) -> ModelStepPlan | None:
    """Under the run's lock: start the run if queued, then claim or create its next model step.

    Returns None when there is nothing for this caller to do.
    """
    with transaction.atomic(), audit.batched():
        run = (
            # of=("self",): lock the run only, not the shared version row that every new run
            # of the agent references (that made submissions wait on workers, and deadlock).
            Run.objects.select_for_update(of=("self",))
            .select_related("agent_version", "agent")
            .filter(pk=run_id)
            .first()
        )
        if run is None or run.status not in (Run.Status.QUEUED, Run.Status.RUNNING):
            return None
        if run.status == Run.Status.QUEUED:
            if run.session_id is not None:
                Session.objects.select_for_update(no_key=True).filter(pk=run.session_id).first()
            if blocked_by_session(run):
                return None  # the session's earlier run nudges this one when it ends
            _transition(
                run,
                from_statuses=(Run.Status.QUEUED,),
                to=Run.Status.RUNNING,
                action="run.started",
                started_at=_now(),
            )
        steps = list(run.steps.order_by("index"))
        last = steps[-1] if steps else None

        if last is not None and last.kind == Step.Kind.TOOL:
            turn = [s for s in steps if s.parent_index == last.parent_index]
            if any(s.status not in Step.DONE_STATUSES for s in turn):
                return None  # the last tool call to finish nudges the run
        elif last is not None and last.kind == Step.Kind.MODEL:
            calls = (last.response or {}).get("tool_calls") if last.status == "succeeded" else None
            if calls:
                # Its tool calls were held back by the step budget, and a reviewer has since
                # granted another budget: record them now.
                _record_tool_calls(run, last, _stored_response(last))
                return None
            if last.status in (Step.Status.PENDING, Step.Status.RUNNING):
                if last.status == Step.Status.RUNNING and not _lease_expired(last):
                    return None  # a live worker has it
                if last.not_before is not None and last.not_before > _now():
                    return None  # backing off; the delayed nudge (or the reconciler) comes back
                if last.status == Step.Status.RUNNING:
                    if last.attempts >= governance.max_attempts(run):
                        Step.objects.filter(pk=last.pk, status=Step.Status.RUNNING).update(
                            status=Step.Status.FAILED,
                            error=f"the worker performing attempt {last.attempts} (the last "
                            "allowed) was lost",
                            finished_at=_now(),
                            lease_expires_at=None,
                        )
                        _fail(
                            run,
                            "worker_lost",
                            f"attempt {last.attempts} of step {last.index} was lost (its worker "
                            "was killed or timed out) and it has no attempts left; giving up",
                        )
                        return None
                    audit.record(
                        "step.lease_expired",
                        run=run,
                        step_index=last.index,
                        payload={"attempts": last.attempts},
                    )
                claimed = Step.objects.filter(
                    pk=last.pk, status=last.status, attempts=last.attempts
                ).update(
                    status=Step.Status.RUNNING,
                    attempts=F("attempts") + 1,
                    lease_expires_at=_lease(),
                    not_before=None,
                    started_at=_now(),
                )
                if not claimed:
                    return None
                last.refresh_from_db()
                messages, tools = build_messages(run, steps[:-1]), _offered_schemas(run)
                return ModelStepPlan(
                    run, last, messages, tools, governance.estimate_input(messages, tools)
                )
            if not (
                last.status == Step.Status.SUCCEEDED and (last.response or {}).get("output_errors")
            ):
                return None  # done; the run's status already reflects its outcome
            # else: the answer failed the output schema; a repair turn follows.

        tools = _offered_schemas(run)
        messages = build_messages(run, steps)
        estimate = governance.estimate_input(messages, tools)
        routine = governance.is_routine(run, steps)
        started = run.started_at or _now()
        problem = governance.budget_problem(
            run,
            governance.Budget.of(run, _allowance(run)),
            steps=len(steps),
            estimate=estimate,
            route=governance.candidate_routes(run, routine=routine)[0],
            elapsed=(_now() - started).total_seconds(),
        )
        if problem:
            _budget_exhausted(run, last, problem)
            return None
        if _refused_turns_in_a_row(steps) >= settings.AGENTSITE_MAX_REFUSALS:
            _fail(
                run,
                "too_many_refusals",
                f"the model's tool calls were refused {settings.AGENTSITE_MAX_REFUSALS} "
                "turns in a row",
            )
            return None

        step = Step.objects.create(
            run=run,
            index=last.index + 1 if last else 0,
            kind=Step.Kind.MODEL,
            status=Step.Status.RUNNING,
            attempts=1,
            lease_expires_at=_lease(),
            started_at=_now(),
            model_route=run.model_route,
            request={"tools": [t["function"]["name"] for t in tools], "routine": routine},
        )
        mark_progress(run)
        return ModelStepPlan(run, step, messages, tools, estimate)


def _offered_schemas(run: Run) -> list[dict[str, Any]]:
    return [spec.openai_schema() for spec in policy.offered_tools(run)]


def advance(run_id: UUID | str) -> Outcome:
    """Decide the run's next step and perform it if it is a model call.

    Idempotent: any number of concurrent or repeated calls perform each step at most once at a
    time. Tool calls are enqueued as their own tasks when the model's answer is recorded.
    """
    plan = _plan(run_id)
    if plan is None:
        return Outcome()
    attributes = {"agentsite.step.kind": "model", "agentsite.step.attempt": plan.step.attempts}
    with tracing.run_span(plan.run, "agent.step", step=plan.step.index, attributes=attributes):
        return _model_step(plan)


def _model_step(plan: ModelStepPlan) -> Outcome:
    """Choose the route, keep the rate limits, call the model and record what it said."""
    run, step = plan.run, plan.step
    version = run.agent_version
    routine = bool((step.request or {}).get("routine"))
    choice = governance.choose_route(
        governance.candidate_routes(run, routine=routine),
        (step.request or {}).get("route_failures") or {},
    )
    throttled = int((step.request or {}).get("throttled", 0))
    if choice.route is None:
        why = "; ".join(f"{r}: {reason}" for r, reason in choice.skipped.items())
        if choice.exhausted:
            return _model_step_failed(step, PermanentProviderError(f"no route left ({why})"))
        error = TransientProviderError(f"no route is available ({why})")
        if throttled < MAX_THROTTLED:  # an outage parks the step; it does not spend attempts
            return _put_off(
                step, choice.retry_in, route="", reason="circuit_open", throttled=throttled + 1
            )
        return _model_step_failed(step, error)
    route = choice.route
    if governance.price_of(route) is None and governance.has_cost_limit(run):
        # The chosen route may be a fallback the budget check did not price.
        return _model_step_failed(
            step,
            PermanentProviderError(
                f"model {route!r} has no price and the run has a cost limit (add a price in "
                "the admin's model prices or AGENTSITE_MODEL_PRICES)"
            ),
            route=route,
        )
    started = time.monotonic()
    quotas: list[limits.Quota] = []
    try:
        provider, model = resolve_route(route)
        quotas = _quotas(run, provider, plan.estimate)
        wait = limits.acquire(quotas, window=settings.AGENTSITE_RATE_WINDOW_SECONDS)
        if wait is not None:
            return _put_off(step, wait, route=route, reason="rate_limited")
        # A half-open circuit's one probe is taken only now, when the call surely goes out.
        busy = governance.take_probe(route) if choice.probe else None
        if busy is not None:
            return _put_off(
                step, busy, route=route, reason="circuit_probe_out", throttled=throttled + 1
            )
        release_connection()  # no connection is pinned while the model thinks
        with (
            tracing.span(
                "model.call",
                kind=SpanKind.CLIENT,
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": route.partition(":")[0],
                    "gen_ai.request.model": model,
                    "agentsite.route": route,
                },
            ) as call,
            soft_time_limit(settings.AGENTSITE_STEP_SOFT_TIME_LIMIT, "the model call"),
        ):
            response = provider.complete(
                ModelRequest(
                    model=model,
                    messages=plan.messages,
                    tools=plan.tools,
                    temperature=version.temperature,
                    script=version.script,
                    attempt=step.attempts,
                )
            )
            call.set_attribute("gen_ai.usage.input_tokens", count(response.input_tokens))
            call.set_attribute("gen_ai.usage.output_tokens", count(response.output_tokens))
    except SoftTimeLimitExceeded:
        governance.report(route, ok=False)
        return _model_step_failed(
            step,
            TransientProviderError("the model call exceeded the step's soft time limit"),
            route=route,
        )
    except RateLimitedProviderError as exc:
        # The provider's own limit: every worker holds back (not only this step), and the
        # step waits without spending an attempt, a few times.
        wait = backoff_seconds(throttled + 1, exc.retry_after)
        limits.pause(_provider_key(route), min(wait, PROVIDER_PAUSE_MAX))
        if throttled < MAX_THROTTLED:
            return _put_off(step, wait, route=route, reason="provider_429", throttled=throttled + 1)
        return _model_step_failed(step, exc, route=route)
    except ProviderError as exc:
        # Only what says the route is unwell feeds its circuit: not our configuration (an
        # unknown provider), nor a request it refused (4xx: too long a context, say).
        if exc.transient or isinstance(exc, InvalidProviderResponse):
            governance.report(route, ok=False)
        return _model_step_failed(step, exc, route=route)
    except DatabaseError as exc:  # e.g. reading the provider's row during a Postgres restart
        return _model_step_failed(step, TransientProviderError(f"database unavailable: {exc}"))
    except Exception as exc:  # a bug, not a provider problem: fail visibly, do not loop
        logger.exception("model step %s of run %s crashed", step.index, run.pk)
        return _model_step_failed(step, exc)
    governance.report(route, ok=True)
    _settle_tokens(quotas, response, time.monotonic() - started)
    latency_ms = int((time.monotonic() - started) * 1000)
    # The answer is paid for: ride out a database outage rather than throw it away.
    ride_out_outage(
        lambda: _record_model_answer(step, response, latency_ms, route=route),
        f"recording step {step.index} of run {run.pk}",
        # What is left of the task's hard time limit (the call ran within the soft one).
        within=settings.AGENTSITE_STEP_HARD_TIME_LIMIT - (time.monotonic() - started) - 2,
    )
    logger.info(
        "model step %s: %s answered in %d ms (%d tokens in, %d out)",
        step.index,
        route,
        latency_ms,
        response.input_tokens,
        response.output_tokens,
        extra={
            "data": {
                "route": route,
                "latency_ms": latency_ms,
                "input_tokens": response.input_tokens,
                "output_tokens": response.output_tokens,
                "tool_calls": len(response.tool_calls),
            }
        },
    )
    return Outcome()


def _quota_key(owner: str, unit: str) -> str:
    """A quota's key names the window it is counted in: a key's buckets are numbered by the
    window, so processes configured with different windows (a rolling deploy changing
    AGENTSITE_RATE_WINDOW_SECONDS) must not share one."""
    return f"{owner}:{unit}:{settings.AGENTSITE_RATE_WINDOW_SECONDS:g}s"


def _provider_key(route: str) -> str:
    return _quota_key(f"provider:{route.partition(':')[0]}", "requests")


def _quotas(run: Run, provider: ModelProvider, estimate: int) -> list[limits.Quota]:
    """The rate limits a call spends: the provider's (its requests quota always, so that a
    429's pause holds every worker back) and the agent's, each per minute."""
    if provider.name == "scripted":
        return []
    agent = run.agent
    never = 2**31 - 1  # a quota with no limit still carries the provider's pause
    owner = f"provider:{provider.name}"
    quotas = [limits.Quota(_quota_key(owner, "requests"), provider.requests_per_minute or never, 1)]
    if provider.tokens_per_minute:
        quotas.append(
            limits.Quota(_quota_key(owner, "tokens"), provider.tokens_per_minute, estimate)
        )
    if agent.requests_per_minute:
        quotas.append(
            limits.Quota(_quota_key(f"agent:{agent.pk}", "requests"), agent.requests_per_minute, 1)
        )
    if agent.tokens_per_minute:
        quotas.append(
            limits.Quota(
                _quota_key(f"agent:{agent.pk}", "tokens"), agent.tokens_per_minute, estimate
            )
        )
    return quotas


def _settle_tokens(quotas: list[limits.Quota], response: ModelResponse, took: float) -> None:
    """Charge the token quotas what the call used instead of its estimate. A refund is only
    taken while the call's own charge is still inside the window (limits.settle gives back
    from the oldest units it holds: after a longer call those would be other calls')."""
    window = settings.AGENTSITE_RATE_WINDOW_SECONDS
    actual = count(response.input_tokens) + count(response.output_tokens)
    for quota in quotas:
        delta = actual - min(quota.cost, quota.limit)
        if ":tokens:" in quota.key and delta and (delta > 0 or took < window):
            limits.settle(quota.key, delta, window=window)


def _put_off(step: Step, wait: float, *, route: str, reason: str, throttled: int = 0) -> Outcome:
    """Give the claimed step back unspent (a rate limit, ours or the provider's, says wait):
    pending again, its attempt returned, not before ``wait`` seconds. No worker slot waits."""
    if reason == "rate_limited":
        # Our limiter never needs longer than a window plus a provider's pause: a longer wait
        # is a miscount, and would park the step for good. (A provider's Retry-After is its
        # own word, already capped by AGENTSITE_RETRY_AFTER_MAX.)
        wait = min(wait, 2 * settings.AGENTSITE_RATE_WINDOW_SECONDS + PROVIDER_PAUSE_MAX)
    with transaction.atomic(), audit.batched():
        run = Run.objects.select_for_update(of=("self",)).get(pk=step.run_id)
        request = dict(step.request or {})
        if throttled:
            request["throttled"] = throttled
        if run.status != Run.Status.RUNNING:
            Step.objects.filter(pk=step.pk, status=Step.Status.RUNNING).update(
                status=Step.Status.CANCELLED, lease_expires_at=None, finished_at=_now()
            )
            return Outcome()
        returned = Step.objects.filter(
            pk=step.pk, status=Step.Status.RUNNING, attempts=step.attempts
        ).update(
            status=Step.Status.PENDING,
            attempts=F("attempts") - 1,
            lease_expires_at=None,
            not_before=_now() + timedelta(seconds=wait),
            request=request,
        )
        if not returned:
            return Outcome()
        audit.record(
            "step.rate_limited",
            run=run,
            step_index=step.index,
            payload={"route": route, "reason": reason, "retry_in": round(wait, 2)},
        )
        Run.objects.filter(pk=run.pk).update(updated_at=_now())
    return Outcome(retry_in=countdown(wait))


def _model_step_failed(step: Step, exc: Exception, *, route: str | None = None) -> Outcome:
    """Record a failed attempt: move to the next route (at once after a non-retryable error or
    once this route has failed AGENTSITE_FALLBACK_AFTER times), retry after a backoff, or fail
    the step and the run when no attempt or route is left."""
    transient = isinstance(exc, ProviderError) and exc.transient
    code = exc.code if isinstance(exc, ProviderError) else "internal_error"
    message = json_safe(
        str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
    )
    with transaction.atomic(), audit.batched():
        run = (
            Run.objects.select_for_update(of=("self",))
            .select_related("agent_version")
            .get(pk=step.run_id)
        )
        if run.status != Run.Status.RUNNING:  # cancelled meanwhile: no retry, no failure
            Step.objects.filter(pk=step.pk, status=Step.Status.RUNNING).update(
                status=Step.Status.CANCELLED, error=message, lease_expires_at=None
            )
            return Outcome()
        request = dict(step.request or {})
        failures = dict(request.get("route_failures") or {})
        next_route = None
        if route is not None and isinstance(exc, ProviderError):
            entry = dict(failures.get(route) or {})
            if transient:
                entry["transient"] = int(entry.get("transient", 0)) + 1
            else:
                entry["permanent"] = message[:500]
            failures[route] = entry
            request["route_failures"] = failures
            routes = governance.candidate_routes(run, routine=bool(request.get("routine")))
            if not transient or entry["transient"] >= settings.AGENTSITE_FALLBACK_AFTER:
                next_route = governance.next_route(routes, failures, after=route)
        retryable = transient or next_route is not None
        if retryable and step.attempts < governance.max_attempts(run):
            delay = (
                0.0
                if next_route is not None
                else backoff_seconds(step.attempts, getattr(exc, "retry_after", None))
            )
            claimed = Step.objects.filter(
                pk=step.pk, status=Step.Status.RUNNING, attempts=step.attempts
            ).update(
                status=Step.Status.PENDING,
                error=message,
                lease_expires_at=None,
                not_before=_now() + timedelta(seconds=delay) if delay else None,
                request=request,
                **({"model_route": route} if route else {}),
            )
            if not claimed:
                return Outcome()
            if next_route is not None:
                audit.record(
                    "step.fallback",
                    run=run,
                    step_index=step.index,
                    payload={"from": route, "to": next_route, "error": message},
                )
            else:
                audit.record(
                    "step.retry_scheduled",
                    run=run,
                    step_index=step.index,
                    payload={
                        "attempt": step.attempts,
                        "route": route,
                        "error": message,
                        "retry_in": round(delay, 2),
                    },
                )
            Run.objects.filter(pk=run.pk).update(updated_at=_now())
            return Outcome(retry_in=countdown(delay))
        claimed = Step.objects.filter(
            pk=step.pk, status=Step.Status.RUNNING, attempts=step.attempts
        ).update(
            status=Step.Status.FAILED,
            error=message,
            finished_at=_now(),
            lease_expires_at=None,
            request=request,
            **({"model_route": route} if route else {}),
        )
        if not claimed:
            return Outcome()
        audit.record(
            "step.failed",
            run=run,
            step_index=step.index,
            payload={"attempts": step.attempts, "route": route, "error": message},
        )
        if transient:
            message = f"gave up after {step.attempts} attempts: {message}"
        _fail(run, code, message)
    return Outcome()


def _record_model_answer(
    step: Step, response: ModelResponse, latency_ms: int, *, route: str
) -> None:
    with transaction.atomic(), audit.batched():
        run = (
            Run.objects.select_for_update(of=("self",))
            .select_related("agent_version")
            .get(pk=step.run_id)
        )
        response.input_tokens = count(response.input_tokens)
        response.output_tokens = count(response.output_tokens)
        cost = governance.cost_of(route, response.input_tokens, response.output_tokens)
        recorded = Step.objects.filter(
            pk=step.pk, status=Step.Status.RUNNING, attempts=step.attempts
        ).update(
            status=Step.Status.SUCCEEDED
            if run.status == Run.Status.RUNNING
            else Step.Status.CANCELLED,
            model_route=route,
            response=json_safe(response.to_json()),
            error="",
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            cost=cost or 0,
            latency_ms=latency_ms,
            finished_at=_now(),
            lease_expires_at=None,
        )
        if not recorded:
            logger.info("run %s step %s: answer discarded, claim lost", run.pk, step.index)
            return
        step.model_route = route
        Run.objects.filter(pk=run.pk).update(
            input_tokens=F("input_tokens") + response.input_tokens,
            output_tokens=F("output_tokens") + response.output_tokens,
            cost=F("cost") + (cost or 0),
            updated_at=_now(),
        )
        # The row is locked by us since it was read: its totals are what we just added to.
        run.input_tokens += response.input_tokens
        run.output_tokens += response.output_tokens
        run.cost += cost or 0
        audit.record(
            "step.succeeded" if run.status == Run.Status.RUNNING else "step.discarded",
            run=run,
            step_index=step.index,
            by=audit.Actor.agent(route),
            payload={
                "kind": "model",
                "route": route,
                **({"instead_of": run.model_route} if route != run.model_route else {}),
                "model": response.raw_model,
                "finish_reason": response.finish_reason,
                "tool_calls": [c.name for c in response.tool_calls],
                "input_tokens": response.input_tokens,
                "output_tokens": response.output_tokens,
                "usage_reported": response.usage_reported,
                "cost": None if cost is None else str(cost),
                "latency_ms": latency_ms,
            },
        )
        if run.status != Run.Status.RUNNING:
            return
        if response.tool_calls:
            _record_tool_calls(run, step, response)
        else:
            _conclude(run, step, response.text or "")


def _confidence(output: Any, text: str) -> float | None:
    value = output
    if not isinstance(value, dict):
        try:
            value = loads_strict(text)
        except ValueError:
            return None
    confidence = value.get("confidence") if isinstance(value, dict) else None
    if not isinstance(confidence, int | float) or isinstance(confidence, bool):
        return None
    # NaN compares false with everything: only a real 0..1 figure can pass the threshold.
    return float(confidence) if math.isfinite(confidence) and 0 <= confidence <= 1 else None


def _hold_for_review(run: Run, **escalation: Any) -> None:
    from approvals.services import escalate

    escalate(run, **escalation)
    _transition(
        run,
        from_statuses=(Run.Status.RUNNING,),
        to=Run.Status.WAITING_APPROVAL,
        action="run.waiting_approval",
        payload={"reason": escalation["reason"]},
    )


def _conclude(run: Run, step: Step, text: str) -> None:
    """The model answered without tool calls: check the answer against the agent's output
    schema (one repair turn, then a reviewer) and its confidence threshold (a reviewer), and
    finish the run with it."""
    from approvals.models import Approval

    from .outputs import OutputInvalid, check_output

    version = run.agent_version
    policy = version.policy
    try:
        output = check_output(version.output_schema, text)
    except OutputInvalid as exc:
        earlier = (
            Step.objects.filter(run=run, kind=Step.Kind.MODEL, index__lt=step.index)
            .order_by("-index")
            .values_list("response", flat=True)
            .first()
        )
        if not (earlier or {}).get("output_errors"):
            # One repair turn: the model reads what was wrong and answers again.
            Step.objects.filter(pk=step.pk).update(
                response={**(step.response or {}), "output_errors": json_safe(str(exc))}
            )
            audit.record(
                "output.invalid",
                run=run,
                step_index=step.index,
                payload={"errors": json_safe(str(exc)), "repair": True},
            )
            advance_run_on_commit(run.pk)
            return
        _hold_for_review(
            run,
            step_index=step.index,
            reason=Approval.Reason.OUTPUT_INVALID,
            detail=f"the answer fails the output schema after one repair attempt: {exc}",
            output=json_safe(text),
        )
        return
    threshold = policy.get("min_confidence")
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        if not version.output_schema and isinstance(output, str):
            try:
                parsed = loads_strict(output)
            except ValueError:
                parsed = None
            output = parsed if isinstance(parsed, dict) else output
        confidence = _confidence(output, text)
        if confidence is None or confidence < threshold:
            _hold_for_review(
                run,
                step_index=step.index,
                reason=Approval.Reason.LOW_CONFIDENCE,
                detail=(
                    "the model gave no confidence"
                    if confidence is None
                    else f"the model's confidence {confidence} is below the agent's "
                    f"threshold {threshold}"
                ),
                output=json_safe(output),
            )
            return
    # The model's answer ends its turn, and a turn is asked for only when every earlier step
    # has finished: nothing is left to cancel.
    finish_run(run, Run.Status.SUCCEEDED, result=json_safe(output), open_steps=False)


def _record_tool_calls(run: Run, model_step: Step, response: ModelResponse) -> None:
    """Create a step per tool call and decide each one (tools.policy): a call the agent may not
    make, or whose arguments fail validation or the grant's constraints, is refused without
    executing; a call to a tool whose circuit is open fails at once; a call whose grant requires
    approval waits for a reviewer; the rest are enqueued to run in parallel."""
    from approvals.models import Approval
    from approvals.services import request_tool_approval

    limit = _step_limit(run)
    if model_step.index + len(response.tool_calls) >= limit:
        _budget_exhausted(
            run,
            model_step,
            f"the model asked for {len(response.tool_calls)} tool calls, which would pass the "
            f"run's limit of {limit} steps",
        )
        return
    live = policy.live_grants(run.agent_id)
    dispatched = held = 0
    for offset, call in enumerate(response.tool_calls, start=1):
        verdict = policy.authorize(
            run,
            call.name,
            call.arguments,
            arguments_error=call.arguments_error,
            live=live,
            step_index=model_step.index + offset,
        )
        if verdict.refusal:
            status = Step.Status.REFUSED
        elif verdict.unavailable:
            status = Step.Status.FAILED
        elif verdict.mode == "require_approval" or call.name == ESCALATE_TOOL:
            status = Step.Status.AWAITING_APPROVAL
        else:
            status = Step.Status.PENDING
        step = Step.objects.create(
            run=run,
            index=model_step.index + offset,
            kind=Step.Kind.TOOL,
            parent_index=model_step.index,
            status=status,
            tool_name=call.name[:100],
            tool_call_id=call.id[:200],
            request={"arguments": call.arguments},
            error=verdict.refusal or verdict.unavailable,
            finished_at=_now() if not verdict.allowed else None,
        )
        if verdict.refusal:
            audit.record(
                "tool_call.refused",
                run=run,
                step_index=step.index,
                payload={"tool": call.name, "reason": verdict.refusal},
            )
            continue
        if verdict.unavailable:
            audit.record(
                "tool_call.short_circuited",
                run=run,
                step_index=step.index,
                payload={"tool": call.name, "reason": verdict.unavailable},
            )
            continue
        assert verdict.spec is not None
        audit.record(
            "tool_call.requested",
            run=run,
            step_index=step.index,
            by=audit.Actor.agent(model_step.model_route or run.model_route),
            payload={"tool": call.name, "call_id": call.id, "mode": verdict.mode},
        )
        if status == Step.Status.AWAITING_APPROVAL and call.name == ESCALATE_TOOL:
            arguments = call.arguments if isinstance(call.arguments, dict) else {}
            request_tool_approval(
                run,
                step,
                reason=Approval.Reason.MODEL_REQUESTED,
                detail=str(arguments.get("reason") or "the model asked for a human"),
            )
            held += 1
        elif status == Step.Status.AWAITING_APPROVAL:
            request_tool_approval(run, step, detail=verdict.approval_reason)
            held += 1
        else:
            tool_call_on_commit(run.pk, step.index, timeout=verdict.spec.timeout)
            dispatched += 1
    if held:
        _transition(
            run,
            from_statuses=(Run.Status.RUNNING,),
            to=Run.Status.WAITING_APPROVAL,
            action="run.waiting_approval",
            payload={"approvals": held},
        )
    elif not dispatched:
        advance_run_on_commit(run.pk)  # let the model read the refusals and failures
