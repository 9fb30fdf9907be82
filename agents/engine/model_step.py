"""A model step: decide the run's next step under its lock (start the run, resume or take
over a model step, or begin the next turn), call the model outside any transaction, and record
its answer, a deferral, a retry, a fallback or a failure.

``advance`` is idempotent: a step already done is never redone, a step being done by a live
worker (unexpired lease) is left alone, and a step whose worker died (lease expired) is taken
over. Tool calls are enqueued as their own tasks when the model's answer is recorded
(``tool_calls``) and performed by ``tool_step``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, transaction
from opentelemetry.trace import SpanKind

from agents import budgets
from agents.errorcodes import RunErrorCode
from agents.jsonsafe import count, json_safe
from agents.models import Run, Step
from agents.providers import (
    InvalidProviderResponse,
    ModelRequest,
    ModelResponse,
    PermanentProviderError,
    ProviderError,
    RateLimitedProviderError,
    TransientProviderError,
    prices,
    quotas,
    resolve_route,
    routing,
)
from agents.providers.base import estimate_input
from agentsite import tracing
from agentsite.pools import release_connection, ride_out_outage, soft_time_limit
from audittrail import writer as audit
from audittrail.actions import AuditAction

from . import answers, budget, steps, transitions
from .conversation import build_messages, offered_schemas, stored_response
from .requests import ModelStepRequest
from .steps import Outcome, backoff_seconds, countdown, now
from .tool_calls import record_tool_calls

logger = logging.getLogger(__name__)

# A step the provider answers 429, or whose every route's circuit is open, is put off this many
# times without spending an attempt; after that it counts as a failed attempt, so a provider
# that never relents fails the run.
MAX_THROTTLED = 20
# A provider's 429 holds every worker back for its Retry-After, up to this; the step itself
# waits the whole Retry-After (up to AGENTSITE_RETRY_AFTER_MAX).
PROVIDER_PAUSE_MAX = 300.0


@dataclass
class ModelStepPlan:
    run: Run
    step: Step
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    estimate: int  # the call's input tokens, roughly (for rate limits)


def advance(run_id: UUID | str) -> Outcome:
    """Decide the run's next step and perform it if it is a model call.

    Idempotent: any number of concurrent or repeated calls perform each step at most once at a
    time. Tool calls are enqueued as their own tasks when the model's answer is recorded.
    """
    planned = plan(run_id)
    if planned is None:
        return Outcome()
    attributes = {"agentsite.step.kind": "model", "agentsite.step.attempt": planned.step.attempts}
    with tracing.run_span(
        planned.run, "agent.step", step=planned.step.index, attributes=attributes
    ):
        return _model_step(planned)


# --- Deciding the next step (under the run's lock) --------------------------------------------


def plan(run_id: UUID | str) -> ModelStepPlan | None:
    """Under the run's lock: start the run if queued, then claim or create its next model step.

    Returns None when there is nothing for this caller to do.
    """
    with transaction.atomic(), audit.batched():
        run = transitions.lock_run(run_id, related=("agent_version", "agent"))
        if run is None or run.status not in (Run.Status.QUEUED, Run.Status.RUNNING):
            return None
        if run.status == Run.Status.QUEUED and not _start(run):
            return None
        done = list(run.steps.order_by("index"))
        last = done[-1] if done else None
        if last is not None and last.kind == Step.Kind.TOOL:
            turn = [s for s in done if s.parent_index == last.parent_index]
            if any(s.status not in Step.DONE_STATUSES for s in turn):
                return None  # the last tool call to finish nudges the run
        elif last is not None and last.kind == Step.Kind.MODEL:
            calls = (last.response or {}).get("tool_calls")
            if last.status == Step.Status.SUCCEEDED and calls:
                # Its tool calls were held back by the step budget, and a reviewer has since
                # granted another budget: record them now.
                record_tool_calls(run, last, stored_response(last))
                return None
            if last.status in (Step.Status.PENDING, Step.Status.RUNNING):
                return _resume(run, done, last)
            if not (
                last.status == Step.Status.SUCCEEDED and (last.response or {}).get("output_errors")
            ):
                return None  # done; the run's status already reflects its outcome
            # else: the answer failed the output schema; a repair turn follows.
        return _next_turn(run, done, last)


def blocked_by_session(run: Run) -> bool:
    """An earlier run of the run's session is still active (runs of a session go one by one)."""
    return (
        run.session_id is not None
        and Run.objects.filter(
            session_id=run.session_id,
            status__in=Run.ACTIVE_STATUSES,
            created_at__lt=run.created_at,
        ).exists()
    )


def _start(run: Run) -> bool:
    """Start a queued run, unless an earlier run of its session is active (that run nudges
    this one when it ends: transitions.finish_run)."""
    transitions.lock_session(run)
    if blocked_by_session(run):
        return False
    return transitions.start(run)


def _resume(run: Run, done: list[Step], step: Step) -> ModelStepPlan | None:
    """Claim the run's unfinished model step: pending (retrying or put off), or running with
    its lease expired (its worker was lost)."""
    if steps.not_yet(step):
        return None  # a live worker has it, or it is backing off (the delayed nudge comes back)
    if step.status == Step.Status.RUNNING:
        if steps.lost_for_good(step, routing.max_attempts(run)):
            steps.fail_lost(step)
            transitions.fail(
                run,
                RunErrorCode.WORKER_LOST,
                f"attempt {step.attempts} of step {step.index} was lost (its worker was killed "
                "or timed out) and it has no attempts left; giving up",
            )
            return None
        audit.record(
            AuditAction.STEP_LEASE_EXPIRED,
            run=run,
            step_index=step.index,
            payload={"attempts": step.attempts},
        )
    if not steps.claim(step, lease_seconds=settings.AGENTSITE_STEP_LEASE_SECONDS):
        return None
    messages, tools = build_messages(run, done[:-1]), offered_schemas(run)
    return ModelStepPlan(run, step, messages, tools, estimate_input(messages, tools))


def _next_turn(run: Run, done: list[Step], last: Step | None) -> ModelStepPlan | None:
    """Begin the next model turn, if the run's budget and its refusals allow one."""
    tools = offered_schemas(run)
    messages = build_messages(run, done)
    estimate = estimate_input(messages, tools)
    routine = routing.is_routine(run, done)
    problem = budgets.budget_problem(
        run,
        budgets.Budget.of(run, budget.allowance(run)),
        steps=len(done),
        estimate=estimate,
        route=routing.candidate_routes(run, routine=routine)[0],
        elapsed=(now() - (run.started_at or now())).total_seconds(),
    )
    if problem:
        budget.exhausted(run, last, problem)
        return None
    if _refused_turns_in_a_row(done) >= settings.AGENTSITE_MAX_REFUSALS:
        transitions.fail(
            run,
            RunErrorCode.TOO_MANY_REFUSALS,
            f"the model's tool calls were refused {settings.AGENTSITE_MAX_REFUSALS} turns in a row",
        )
        return None
    request = ModelStepRequest(tools=[t["function"]["name"] for t in tools], routine=routine)
    step = steps.create_running(
        run,
        lease_seconds=settings.AGENTSITE_STEP_LEASE_SECONDS,
        index=last.index + 1 if last else 0,
        kind=Step.Kind.MODEL,
        model_route=run.model_route,
        request=request.to_json(),
    )
    transitions.mark_progress(run)
    return ModelStepPlan(run, step, messages, tools, estimate)


def _refused_turns_in_a_row(done: list[Step]) -> int:
    count = 0
    for model_step in reversed([s for s in done if s.kind == Step.Kind.MODEL]):
        calls = [s for s in done if s.parent_index == model_step.index]
        if calls and all(s.status == Step.Status.REFUSED for s in calls):
            count += 1
        else:
            break
    return count


# --- Calling the model (outside any transaction) ----------------------------------------------


def _model_step(plan: ModelStepPlan) -> Outcome:
    """Choose the route, keep the rate limits, call the model and record what it said."""
    run, step = plan.run, plan.step
    request = ModelStepRequest.of(step)
    choice = routing.choose_route(
        routing.candidate_routes(run, routine=request.routine), request.route_failures
    )
    throttled = request.throttled
    if choice.route is None:
        return _no_route(step, choice, throttled)
    route = choice.route
    if prices.price_of(route) is None and budgets.has_cost_limit(run):
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
    try:
        called = _call(plan, route, probe=choice.probe, throttled=throttled)
    except SoftTimeLimitExceeded:
        routing.report(route, ok=False)
        return _model_step_failed(
            step,
            TransientProviderError("the model call exceeded the step's soft time limit"),
            route=route,
        )
    except RateLimitedProviderError as exc:
        # The provider's own limit: every worker holds back (not only this step), and the
        # step waits without spending an attempt, a few times.
        wait = backoff_seconds(throttled + 1, exc.retry_after)
        quotas.pause(quotas.provider_key(route), min(wait, PROVIDER_PAUSE_MAX))
        if throttled < MAX_THROTTLED:
            return _put_off(step, wait, route=route, reason="provider_429", throttled=throttled + 1)
        return _model_step_failed(step, exc, route=route)
    except ProviderError as exc:
        # Only what says the route is unwell feeds its circuit: not our configuration (an
        # unknown provider), nor a request it refused (4xx: too long a context, say).
        if exc.transient or isinstance(exc, InvalidProviderResponse):
            routing.report(route, ok=False)
        return _model_step_failed(step, exc, route=route)
    except DatabaseError as exc:  # e.g. reading the provider's row during a Postgres restart
        return _model_step_failed(step, TransientProviderError(f"database unavailable: {exc}"))
    except Exception as exc:  # a bug, not a provider problem: fail visibly, do not loop
        logger.exception("model step %s of run %s crashed", step.index, run.pk)
        return _model_step_failed(step, exc)
    if isinstance(called, Outcome):
        return called
    response, spent = called
    routing.report(route, ok=True)
    quotas.settle_tokens(spent, response, time.monotonic() - started)
    _answered(step, response, route=route, started=started)
    return Outcome()


def _no_route(step: Step, choice: routing.RouteChoice, throttled: int) -> Outcome:
    """Every route is ruled out (the step fails over) or its circuit is open (it waits)."""
    why = "; ".join(f"{r}: {reason}" for r, reason in choice.skipped.items())
    if choice.exhausted:
        return _model_step_failed(step, PermanentProviderError(f"no route left ({why})"))
    if throttled < MAX_THROTTLED:  # an outage parks the step; it does not spend attempts
        return _put_off(
            step, choice.retry_in, route="", reason="circuit_open", throttled=throttled + 1
        )
    return _model_step_failed(step, TransientProviderError(f"no route is available ({why})"))


def _call(
    plan: ModelStepPlan, route: str, *, probe: bool, throttled: int
) -> tuple[ModelResponse, list[quotas.Quota]] | Outcome:
    """Spend the rate limits and call the model on ``route``; or, when a limit or a half-open
    circuit says wait, put the step off."""
    run, step = plan.run, plan.step
    provider, model = resolve_route(route)
    spent = quotas.for_call(provider, run.agent, plan.estimate)
    wait = quotas.acquire(spent, window=settings.AGENTSITE_RATE_WINDOW_SECONDS)
    if wait is not None:
        return _put_off(step, wait, route=route, reason="rate_limited")
    # A half-open circuit's one probe is taken only now, when the call surely goes out.
    busy = routing.take_probe(route) if probe else None
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
                temperature=run.agent_version.temperature,
                script=run.agent_version.script,
                attempt=step.attempts,
            )
        )
        call.set_attribute("gen_ai.usage.input_tokens", count(response.input_tokens))
        call.set_attribute("gen_ai.usage.output_tokens", count(response.output_tokens))
    return response, spent


def _answered(step: Step, response: ModelResponse, *, route: str, started: float) -> None:
    """Record the answer (it is paid for: ride out a database outage rather than throw it
    away) and log it."""
    latency_ms = int((time.monotonic() - started) * 1000)
    ride_out_outage(
        lambda: record_model_answer(step, response, latency_ms, route=route),
        f"recording step {step.index} of run {step.run_id}",
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


# --- Recording what came of it (under the run's lock) -----------------------------------------


def _put_off(step: Step, wait: float, *, route: str, reason: str, throttled: int = 0) -> Outcome:
    """Give the claimed step back unspent (a rate limit, ours or the provider's, or an open
    circuit says wait): pending again, its attempt returned, not before ``wait`` seconds. No
    worker slot waits."""
    if reason == "rate_limited":
        # Our limiter never needs longer than a window plus a provider's pause: a longer wait
        # is a miscount, and would park the step for good. (A provider's Retry-After is its
        # own word, already capped by AGENTSITE_RETRY_AFTER_MAX.)
        wait = min(wait, 2 * settings.AGENTSITE_RATE_WINDOW_SECONDS + PROVIDER_PAUSE_MAX)
    with transaction.atomic(), audit.batched():
        run = transitions.lock_run(step.run_id)
        if run is None or run.status != Run.Status.RUNNING:
            steps.cancel_running(step, finished_at=now())
            return Outcome()
        request = ModelStepRequest.of(step)
        if throttled:
            request = replace(request, throttled=throttled)
        deferred = steps.schedule_retry(
            run,
            step,
            delay=wait,
            refund=True,
            action=AuditAction.STEP_DEFERRED,
            payload={"route": route, "reason": reason, "retry_in": round(wait, 2)},
            request=request.to_json(),
        )
    return Outcome(retry_in=countdown(wait)) if deferred else Outcome()


def _model_step_failed(step: Step, exc: Exception, *, route: str | None = None) -> Outcome:
    """Record a failed attempt: move to the next route (at once after a non-retryable error or
    once this route has failed AGENTSITE_FALLBACK_AFTER times), retry after a backoff, or fail
    the step and the run when no attempt or route is left."""
    transient = isinstance(exc, ProviderError) and exc.transient
    code = exc.code if isinstance(exc, ProviderError) else RunErrorCode.INTERNAL_ERROR
    message = json_safe(
        str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
    )
    with transaction.atomic(), audit.batched():
        run = transitions.lock_run(step.run_id, related=("agent_version",))
        if run is None or run.status != Run.Status.RUNNING:
            steps.cancel_running(step, error=message)  # cancelled meanwhile: no retry
            return Outcome()
        request = ModelStepRequest.of(step)
        next_route = None
        if route is not None and isinstance(exc, ProviderError):
            entry = dict(request.route_failures.get(route) or {})
            if transient:
                entry["transient"] = int(entry.get("transient", 0)) + 1
            else:
                entry["permanent"] = message[:500]
            request = request.with_failure(route, entry)
            routes = routing.candidate_routes(run, routine=request.routine)
            if not transient or entry["transient"] >= settings.AGENTSITE_FALLBACK_AFTER:
                next_route = routing.next_route(routes, request.route_failures, after=route)
        fields: dict[str, Any] = {"error": message, "request": request.to_json()}
        if route:
            fields["model_route"] = route
        retryable = transient or next_route is not None
        if retryable and step.attempts < routing.max_attempts(run):
            if next_route is not None:
                delay = 0.0
                action = AuditAction.STEP_FALLBACK
                payload: dict[str, Any] = {"from": route, "to": next_route, "error": message}
            else:
                delay = backoff_seconds(step.attempts, getattr(exc, "retry_after", None))
                action = AuditAction.STEP_RETRY_SCHEDULED
                payload = {
                    "attempt": step.attempts,
                    "route": route,
                    "error": message,
                    "retry_in": round(delay, 2),
                }
            if not steps.schedule_retry(
                run, step, delay=delay, action=action, payload=payload, **fields
            ):
                return Outcome()
            return Outcome(retry_in=countdown(delay))
        if not steps.finish(step, Step.Status.FAILED, **fields):
            return Outcome()
        audit.record(
            AuditAction.STEP_FAILED,
            run=run,
            step_index=step.index,
            payload={"attempts": step.attempts, "route": route, "error": message},
        )
        if transient:
            message = f"gave up after {step.attempts} attempts: {message}"
        transitions.fail(run, code, message)
    return Outcome()


def record_model_answer(
    step: Step, response: ModelResponse, latency_ms: int, *, route: str
) -> None:
    """Record what the model said (its usage and cost charged to the run), then go on: its
    tool calls become steps, or its answer concludes the run. Nothing is recorded if the
    claim was lost meanwhile."""
    with transaction.atomic(), audit.batched():
        run = transitions.lock_run(step.run_id, related=("agent_version",))
        if run is None:
            return
        response.input_tokens = count(response.input_tokens)
        response.output_tokens = count(response.output_tokens)
        cost = prices.cost_of(route, response.input_tokens, response.output_tokens)
        running = run.status == Run.Status.RUNNING
        recorded = steps.finish(
            step,
            Step.Status.SUCCEEDED if running else Step.Status.CANCELLED,
            model_route=route,
            response=json_safe(response.to_json()),
            error="",
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            cost=cost or 0,
            latency_ms=latency_ms,
        )
        if not recorded:
            logger.info("run %s step %s: answer discarded, claim lost", run.pk, step.index)
            return
        step.model_route = route
        transitions.charge(
            run, input_tokens=response.input_tokens, output_tokens=response.output_tokens, cost=cost
        )
        audit.record(
            AuditAction.STEP_SUCCEEDED if running else AuditAction.STEP_DISCARDED,
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
        if not running:
            return
        if response.tool_calls:
            record_tool_calls(run, step, response)
        else:
            answers.conclude(run, step, response.text or "")
