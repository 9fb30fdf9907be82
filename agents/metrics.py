"""The agents app's metrics: runs, steps, model and tool calls and webhooks, counted from the
audit trail; active runs and circuit breakers, read when scraped (agentsite.metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from django.db.models import Count
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric, StateSetMetricFamily

from agentsite import breaker, metrics
from agentsite.metrics import agent_label, bounded
from audittrail.actions import RUN_FINISHED, TOOL_CALL_ENDED, AuditAction
from tools.metrics import tool_label
from tools.registry import registry

from .models import Agent, AgentVersion, ModelPrice, Run
from .providers.routing import breaker_key

RUNS_SUBMITTED = Counter("agentsite_runs_submitted", "Runs accepted, by agent.", ["agent"])


RUNS_FINISHED = Counter(
    "agentsite_runs_finished",
    "Runs that reached a final status (succeeded, failed, cancelled), by agent.",
    ["agent", "status"],
)


STEP_DURATION = Histogram(
    "agentsite_step_duration_seconds",
    "Executing time of a step's call: a model call that answered, or a tool call (whatever "
    "its outcome). model is the route for model steps, tool the tool's name for tool steps.",
    ["kind", "model", "tool"],
    buckets=metrics.STEP_BUCKETS,
)


MODEL_TOKENS = Counter(
    "agentsite_model_tokens",
    "Tokens of model calls, by agent, route and direction (input or output).",
    ["agent", "model", "direction"],
)


MODEL_COST = Counter(
    "agentsite_model_cost",
    "Cost of model calls in the currency of the model prices, by agent and route.",
    ["agent", "model"],
)


MODEL_CALLS = Counter(
    "agentsite_model_calls",
    "Model calls by route and outcome (succeeded, retried, fell_back, failed).",
    ["model", "outcome"],
)


TOOL_CALLS = Counter(
    "agentsite_tool_calls",
    "Tool calls by tool and outcome (succeeded, failed, refused, short_circuited).",
    ["tool", "outcome"],
)


TOOL_ERRORS = Counter(
    "agentsite_tool_errors",
    "Tool calls that did not succeed, by tool and error type (tool_error, timeout, transient, "
    "crash, refused, circuit_open, worker_lost, not_installed, not_approved).",
    ["tool", "type"],
)


STEP_RETRIES = Counter(
    "agentsite_step_retries",
    "Retries scheduled after a failed attempt, by step kind, route (model) and tool.",
    ["kind", "model", "tool"],
)


MODEL_FALLBACKS = Counter(
    "agentsite_model_fallbacks",
    "Model steps moved from a failing route to the next one, by the route left.",
    ["model"],
)


STEP_DEFERRALS = Counter(
    "agentsite_step_deferrals",
    "Model steps put off without spending an attempt, by route and reason (rate_limited: our "
    "limiter; provider_429: the provider's; circuit_open, circuit_probe_out: the breaker).",
    ["model", "reason"],
)


WEBHOOK_DELIVERIES = Counter(
    "agentsite_webhook_deliveries",
    "Run webhooks that ended: delivered, or failed for good (after every attempt).",
    ["outcome"],
)


# --- Bounded labels ---------------------------------------------------------------------------

_routes: dict[str, Any] = {"at": -1e9, "known": frozenset(), "window": -1e9, "reloads": 0}
_ROUTES_TTL = 30.0
# A route not known is looked for once (an operator may have just configured it), then taken
# as unknown for the interval; at most this many such reads per interval and process, so a
# stream of made-up routes costs a bounded number of queries.
_MISS_RELOADS = 100
_unknown: dict[str, float] = {}


def known_routes(*, force: bool = False) -> frozenset[str]:
    """The routes operators configured (every version's route, routine route and fallbacks,
    and the priced routes), read every 30 s per process (or now, with ``force``)."""
    now = time.monotonic()
    if not force and now - _routes["at"] < _ROUTES_TTL:
        return _routes["known"]  # type: ignore[no-any-return]
    # Greenlets that find it stale meanwhile, and reads after a failed one, use what is known
    # until the next interval instead of querying too.
    _routes["at"] = now
    found: set[str] = set()
    try:
        for model_, routine, fallbacks in (
            *Agent.objects.values_list("model_route", "routine_route", "fallback_routes"),
            *AgentVersion.objects.values_list("model_route", "routine_route", "fallback_routes")
            .order_by()
            .distinct(),
        ):
            found.update(r for r in (model_, routine) if r)
            found.update(r for r in fallbacks or [] if isinstance(r, str))
        found.update(ModelPrice.objects.values_list("route", flat=True))
    except Exception:  # keep what was known; a metric must not fail the caller
        return _routes["known"]  # type: ignore[no-any-return]
    _routes["known"] = frozenset(found)
    return _routes["known"]  # type: ignore[no-any-return]


def model_label(route: Any) -> str:
    """A configured route, or ``other``: a client may override a run's route with one of its
    own, and each would otherwise be a series."""
    text = str(route or "")
    if not text:
        return ""
    if text in known_routes():
        return metrics.bounded("model", text)
    now = time.monotonic()
    if now - _unknown.get(text, -1e9) < _ROUTES_TTL:
        return metrics.OTHER
    if now - _routes["window"] >= _ROUTES_TTL:
        _routes.update(window=now, reloads=0)
    if _routes["reloads"] < _MISS_RELOADS:
        _routes["reloads"] += 1
        if text in known_routes(force=True):
            return metrics.bounded("model", text)
    if len(_unknown) >= 10_000:
        _unknown.clear()
    _unknown[text] = now
    return metrics.OTHER


def _slug_of(agent_id: int) -> str | None:
    return Agent.objects.filter(pk=agent_id).values_list("slug", flat=True).first()


# --- Events, from the audit trail -------------------------------------------------------------


def _seconds(payload: dict[str, Any]) -> float | None:
    value = payload.get("latency_ms")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) / 1000
    return None


def _run_submitted(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    RUNS_SUBMITTED.labels(agent_label(agent_id)).inc()


def _run_finished(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    RUNS_FINISHED.labels(agent_label(agent_id), action.partition(".")[2]).inc()


def _model_answered(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    """A model step that succeeded, or whose answer was discarded (the run was cancelled
    meanwhile: it was still paid for)."""
    if payload.get("kind") != "model":
        return
    model = model_label(payload.get("route"))
    agent = agent_label(agent_id)
    MODEL_CALLS.labels(model, "succeeded").inc()
    seconds = _seconds(payload)
    if seconds is not None:
        STEP_DURATION.labels("model", model, "").observe(seconds)
    for direction in ("input", "output"):
        tokens = payload.get(f"{direction}_tokens")
        if isinstance(tokens, int) and tokens > 0:
            MODEL_TOKENS.labels(agent, model, direction).inc(tokens)
    cost = payload.get("cost")
    if isinstance(cost, str | int | float) and cost != "":
        value = float(cost)
        if value > 0:
            MODEL_COST.labels(agent, model).inc(value)


def _retry_scheduled(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    if payload.get("tool"):
        STEP_RETRIES.labels("tool", "", tool_label(payload["tool"])).inc()
        return
    model = model_label(payload.get("route"))
    STEP_RETRIES.labels("model", model, "").inc()
    if model:  # a call was made (not, say, a database error before it)
        MODEL_CALLS.labels(model, "retried").inc()


def _fell_back(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    model = model_label(payload.get("from"))
    MODEL_FALLBACKS.labels(model).inc()
    MODEL_CALLS.labels(model, "fell_back").inc()


def _deferred(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    STEP_DEFERRALS.labels(
        model_label(payload.get("route")), bounded("reason", payload.get("reason"))
    ).inc()


def _step_failed(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    if payload.get("route"):
        MODEL_CALLS.labels(model_label(payload.get("route")), "failed").inc()


# What a tool call that did not succeed counts as, when its payload names no error type.
_TOOL_ERROR_TYPES = {
    AuditAction.TOOL_CALL_REFUSED: "refused",
    AuditAction.TOOL_CALL_SHORT_CIRCUITED: "circuit_open",
}


def _tool_call_ended(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    outcome = action.partition(".")[2]
    tool = tool_label(payload.get("tool"))
    TOOL_CALLS.labels(tool, outcome).inc()
    seconds = _seconds(payload)
    if seconds is not None and action in (
        AuditAction.TOOL_CALL_SUCCEEDED,
        AuditAction.TOOL_CALL_FAILED,
    ):
        STEP_DURATION.labels("tool", "", tool).observe(seconds)
    if action != AuditAction.TOOL_CALL_SUCCEEDED:
        default = _TOOL_ERROR_TYPES.get(AuditAction(action), "failed")
        TOOL_ERRORS.labels(tool, bounded("error_type", payload.get("error_type") or default)).inc()


def _webhook_ended(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    WEBHOOK_DELIVERIES.labels(action.partition(".")[2]).inc()


# --- State, read when scraped -----------------------------------------------------------------


def _run_gauges() -> Iterable[Metric]:
    counts = dict(
        Run.objects.filter(status__in=Run.ACTIVE_STATUSES)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    gauge = GaugeMetricFamily(
        "agentsite_runs_active", "Runs not yet final, by status.", labels=["status"]
    )
    for status in Run.ACTIVE_STATUSES:
        gauge.add_metric([str(status)], counts.get(status, 0))
    yield gauge


def _breaker_names() -> list[str]:
    names = registry.names()
    routes: set[str] = set()
    agents = Agent.objects.filter(is_active=True).values_list(
        "model_route", "routine_route", "fallback_routes"
    )
    for route, routine, fallbacks in agents:
        routes.update(r for r in (route, routine) if r)
        routes.update(r for r in fallbacks or [] if isinstance(r, str))
    names.extend(key for key in map(breaker_key, sorted(routes)) if key is not None)
    return names


def _breaker_gauges() -> Iterable[Metric]:
    states = breaker.all_states(_breaker_names())
    family = StateSetMetricFamily(
        "agentsite_circuit_breaker_state",
        "Circuit-breaker state of a tool, or of a model route (model:<route>).",
        labels=["breaker"],
    )
    for name, state in states.items():
        family.add_metric(
            [bounded("breaker", name)],
            {s: state.state == s for s in (breaker.CLOSED, breaker.OPEN, breaker.HALF_OPEN)},
        )
    yield family


def register() -> None:
    """Add this app's metrics to agentsite.metrics (AgentsConfig.ready)."""
    metrics.read_agent_slugs_with(_slug_of)
    metrics.count_events([AuditAction.RUN_SUBMITTED], _run_submitted)
    metrics.count_events(RUN_FINISHED, _run_finished)
    metrics.count_events([AuditAction.STEP_SUCCEEDED, AuditAction.STEP_DISCARDED], _model_answered)
    metrics.count_events([AuditAction.STEP_RETRY_SCHEDULED], _retry_scheduled)
    metrics.count_events([AuditAction.STEP_FALLBACK], _fell_back)
    metrics.count_events([AuditAction.STEP_DEFERRED], _deferred)
    metrics.count_events([AuditAction.STEP_FAILED], _step_failed)
    metrics.count_events(TOOL_CALL_ENDED, _tool_call_ended)
    metrics.count_events(
        [AuditAction.WEBHOOK_DELIVERED, AuditAction.WEBHOOK_FAILED], _webhook_ended
    )
    metrics.collect_state(_run_gauges)
    metrics.collect_state(_breaker_gauges)
