"""Prometheus metrics: what the engine did (counted from the audit trail) and what is waiting.

Two kinds, kept apart so that no figure is counted twice when several processes are scraped:

- **Event metrics** (counters and histograms) live in the process where the event happened:
  runs submitted in the web process, steps and their tokens, cost, retries and deferrals in
  the worker that performed them. They are fed by ``observe`` from ``agents.audit.record``,
  once the transaction that wrote the audit event commits, so a rolled-back change or a claim
  lost to another worker is never counted. Sum them across processes (``sum by (...)``).
- **State metrics** (gauges: active runs, pending approvals and their age, Celery queue
  depth, circuit-breaker states) are read from Postgres and Redis when ``/metrics`` of the web
  process is scraped (``StateCollector``); workers do not repeat them.

Each process serves its own registry: the web process at ``/metrics``, a worker on
``AGENTSITE_WORKER_METRICS_PORT``. With ``PROMETHEUS_MULTIPROC_DIR`` set (a directory per
service, emptied when the service starts) prometheus-client's multiprocess mode adds up the
processes that share it: gunicorn's workers, or a prefork worker's children.

Label values are bounded: a route, tool or agent name beyond the first
``AGENTSITE_METRICS_MAX_LABEL_VALUES`` seen by a process for that label is reported as
``other``, and no label carries a run id or anything else per request.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector

from . import heartbeats, rediskeys
from .heartbeats import celery_queues

logger = logging.getLogger(__name__)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # A metric without labels writes its file as it is defined (below): the directory must be
    # there first, even on a fresh checkout (make up's prefork worker, a new container).
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

OTHER = "other"
# Model calls take from tens of milliseconds (a cache, a small model) to minutes.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

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
    buckets=STEP_BUCKETS,
)
TASK_WAIT = Histogram(
    "agentsite_task_wait_seconds",
    "Time a Celery message waited between being due (published, or its countdown over) and a "
    "worker starting it, by task: the queue's latency as the work sees it.",
    ["task"],
    buckets=STEP_BUCKETS,
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
APPROVALS_REQUESTED = Counter(
    "agentsite_approvals_requested",
    "Steps escalated to the human review queue, by agent and reason.",
    ["agent", "reason"],
)
APPROVALS_DECIDED = Counter(
    "agentsite_approvals_decided",
    "Reviews ended, by agent and outcome (approved, edited, rejected, expired, cancelled).",
    ["agent", "outcome"],
)
WEBHOOK_DELIVERIES = Counter(
    "agentsite_webhook_deliveries",
    "Run webhooks that ended: delivered, or failed for good (after every attempt).",
    ["outcome"],
)
OUTBOX_DELIVERIES = Counter(
    "agentsite_outbox_deliveries",
    "Side effects the outbox relay tried to deliver, by kind and outcome (delivered; retry: "
    "failed, tried again on a later pass; failed: given up).",
    ["kind", "outcome"],
)
EVENT_STREAMS = Gauge(
    "agentsite_event_streams_open",
    "Server-Sent Event streams of runs open now (their time is not in the request duration).",
    multiprocess_mode="livesum",
)
HTTP_REQUESTS = Counter(
    "agentsite_http_requests",
    "HTTP requests by method, URL pattern and status code.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "agentsite_http_request_duration_seconds",
    "HTTP request time by method and URL pattern (until the response is returned; a "
    "streamed response's body is not included).",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
)

# --- Bounded labels ---------------------------------------------------------------------------

_seen: dict[str, set[str]] = {}
_seen_lock = threading.Lock()


def bounded(label: str, value: Any) -> str:
    """``value`` for ``label``, or ``other`` once this process has seen too many distinct ones
    (AGENTSITE_METRICS_MAX_LABEL_VALUES): operators name agents, tools and routes, but a client
    may send a model route of its own, and a series per value would grow without end."""
    text = str(value or "")[:120]
    seen = _seen.get(label)
    if seen is not None and text in seen:
        return text
    with _seen_lock:
        seen = _seen.setdefault(label, set())
        if text in seen:
            return text
        if len(seen) >= settings.AGENTSITE_METRICS_MAX_LABEL_VALUES:
            return OTHER
        seen.add(text)
        return text


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str | None) -> str:
    """A request's method, or ``other`` (any caller may send a made-up one)."""
    return method if method in HTTP_METHODS else OTHER


def tool_label(name: Any) -> str:
    """An installed tool's name, or ``other``: the model names the tools it calls, and a
    refused call to a tool that does not exist must not make a series of its own."""
    from tools.registry import registry

    text = str(name or "")
    return bounded("tool", text) if text in registry else OTHER


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
    import time

    now = time.monotonic()
    if not force and now - _routes["at"] < _ROUTES_TTL:
        return _routes["known"]  # type: ignore[no-any-return]
    from agents.models import Agent, AgentVersion, ModelPrice

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
    import time

    text = str(route or "")
    if not text:
        return ""
    if text in known_routes():
        return bounded("model", text)
    now = time.monotonic()
    if now - _unknown.get(text, -1e9) < _ROUTES_TTL:
        return OTHER
    if now - _routes["window"] >= _ROUTES_TTL:
        _routes.update(window=now, reloads=0)
    if _routes["reloads"] < _MISS_RELOADS:
        _routes["reloads"] += 1
        if text in known_routes(force=True):
            return bounded("model", text)
    if len(_unknown) >= 10_000:
        _unknown.clear()
    _unknown[text] = now
    return OTHER


_agent_slugs: dict[int, str] = {}


def agent_slug(agent_id: int | None, *, loaded: Any = None) -> str:
    """The agent's slug (cached per process: a slug is an agent's name, and rarely changes);
    ``loaded`` is the agent when the caller has it already (no query then)."""
    if agent_id is None:
        return ""
    slug = _agent_slugs.get(agent_id)
    if slug is None and loaded is not None and len(_agent_slugs) < 10_000:
        slug = _agent_slugs[agent_id] = loaded.slug
    if slug is None:
        from agents.models import Agent

        try:
            slug = Agent.objects.filter(pk=agent_id).values_list("slug", flat=True).first()
        except Exception:  # a metric or a log line is never worth failing the caller
            return f"#{agent_id}"
        slug = slug or f"#{agent_id}"
        if len(_agent_slugs) < 10_000:
            _agent_slugs[agent_id] = slug
    return slug


def agent_label(agent_id: int | None) -> str:
    return bounded("agent", agent_slug(agent_id))


# --- Events, from the audit trail -------------------------------------------------------------

_DECIDED = {"approved", "rejected", "expired", "cancelled"}  # an edit is approved, edited
_TOOL_OUTCOMES = {"succeeded", "failed", "refused", "short_circuited"}


_COUNTED = {
    "run.submitted",
    "run.succeeded",
    "run.failed",
    "run.cancelled",
    "step.succeeded",
    "step.discarded",
    "step.retry_scheduled",
    "step.fallback",
    "step.rate_limited",
    "step.failed",
    "approval.requested",
    "webhook.delivered",
    "webhook.failed",
    *(f"tool_call.{outcome}" for outcome in _TOOL_OUTCOMES),
    *(f"approval.{outcome}" for outcome in _DECIDED),
}


def counts(action: str) -> bool:
    """Whether an audit event of ``action`` moves a metric."""
    return action in _COUNTED


def observe(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    """Count one committed audit event. Never raises: a metric must not fail a step."""
    try:
        _observe(action, agent_id, payload)
    except Exception:
        logger.exception("metrics: could not count %s", action)


def _ms(payload: dict[str, Any]) -> float | None:
    value = payload.get("latency_ms")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) / 1000
    return None


def _observe(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    family, _, what = action.partition(".")
    if family == "run":
        if what == "submitted":
            RUNS_SUBMITTED.labels(agent_label(agent_id)).inc()
        elif what in ("succeeded", "failed", "cancelled"):
            RUNS_FINISHED.labels(agent_label(agent_id), what).inc()
    elif family == "step":
        _observe_step(what, agent_id, payload)
    elif family == "tool_call" and what in _TOOL_OUTCOMES:
        tool = tool_label(payload.get("tool"))
        TOOL_CALLS.labels(tool, what).inc()
        seconds = _ms(payload)
        if seconds is not None and what in ("succeeded", "failed"):
            STEP_DURATION.labels("tool", "", tool).observe(seconds)
        if what != "succeeded":
            default = {"refused": "refused", "short_circuited": "circuit_open"}.get(what, "failed")
            TOOL_ERRORS.labels(
                tool, bounded("error_type", payload.get("error_type") or default)
            ).inc()
    elif family == "webhook":
        WEBHOOK_DELIVERIES.labels(what).inc()
    elif family == "approval":
        if what == "requested":
            APPROVALS_REQUESTED.labels(
                agent_label(agent_id), bounded("reason", payload.get("reason"))
            ).inc()
        elif what in _DECIDED:
            outcome = "edited" if what == "approved" and payload.get("edited") else what
            APPROVALS_DECIDED.labels(agent_label(agent_id), outcome).inc()


def _observe_step(what: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    if what in ("succeeded", "discarded") and payload.get("kind") == "model":
        model = model_label(payload.get("route"))
        agent = agent_label(agent_id)
        MODEL_CALLS.labels(model, "succeeded").inc()
        seconds = _ms(payload)
        if seconds is not None:
            STEP_DURATION.labels("model", model, "").observe(seconds)
        # A discarded answer (the run was cancelled meanwhile) was still paid for.
        for direction in ("input", "output"):
            tokens = payload.get(f"{direction}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                MODEL_TOKENS.labels(agent, model, direction).inc(tokens)
        cost = payload.get("cost")
        if isinstance(cost, str | int | float) and cost != "":
            value = float(cost)
            if value > 0:
                MODEL_COST.labels(agent, model).inc(value)
    elif what == "retry_scheduled":
        if payload.get("tool"):
            STEP_RETRIES.labels("tool", "", tool_label(payload["tool"])).inc()
        else:
            model = model_label(payload.get("route"))
            STEP_RETRIES.labels("model", model, "").inc()
            if model:  # a call was made (not, say, a database error before it)
                MODEL_CALLS.labels(model, "retried").inc()
    elif what == "fallback":
        model = model_label(payload.get("from"))
        MODEL_FALLBACKS.labels(model).inc()
        MODEL_CALLS.labels(model, "fell_back").inc()
    elif what == "rate_limited":
        STEP_DEFERRALS.labels(
            model_label(payload.get("route")), bounded("reason", payload.get("reason"))
        ).inc()
    elif what == "failed" and payload.get("route"):
        MODEL_CALLS.labels(model_label(payload.get("route")), "failed").inc()


SENT_HEADER = "agentsite_sent_at"  # when a message was published (epoch seconds)


def task_started(task: Any) -> None:
    """A worker starts a message: how long it waited since it was due (published, or its
    countdown over). Messages published by other programs carry no time and are not counted."""
    import time
    from datetime import datetime

    request = task.request
    sent = request.get(SENT_HEADER)
    if not isinstance(sent, int | float) or isinstance(sent, bool):
        return
    due = float(sent)
    eta = request.eta
    if eta:
        try:
            moment = eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))
            due = max(due, moment.timestamp())
        except (TypeError, ValueError):
            pass
    TASK_WAIT.labels(bounded("task", task.name)).observe(max(0.0, time.time() - due))


# --- State, read when scraped -----------------------------------------------------------------


class StateCollector(Collector):
    """Gauges read from Postgres and Redis at scrape time. A source that cannot be read is
    left out of this scrape (and logged) rather than failing the whole scrape."""

    def collect(self) -> Iterator[Metric]:
        for read in (
            _run_gauges,
            _approval_gauges,
            _outbox_gauges,
            _queue_gauges,
            _consumer_gauges,
            _breaker_gauges,
        ):
            try:
                yield from read()
            except Exception as exc:
                logger.warning(
                    "metrics: %s unavailable: %s: %s", read.__name__, type(exc).__name__, exc
                )


def _run_gauges() -> Iterable[Metric]:
    from django.db.models import Count

    from agents.models import Run

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


def _waiting(
    pending: Any, by: str, label: str, name: str, what: str
) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """``agentsite_<name>_pending`` and ``..._oldest_pending_age_seconds`` of the rows of
    ``pending`` (a queryset with ``created_at``), grouped by the field ``by``: one query."""
    from django.db.models import Count, Min
    from django.utils import timezone

    rows = (
        pending.values_list(by)
        .annotate(n=Count("id"), oldest=Min("created_at"))
        .values_list(by, "n", "oldest")
    )
    count = GaugeMetricFamily(
        f"agentsite_{name}_pending", f"{what} waiting, by {label}.", labels=[label]
    )
    age = GaugeMetricFamily(
        f"agentsite_{name}_oldest_pending_age_seconds",
        f"Age of the oldest of the {what.lower()} waiting, by {label}.",
        labels=[label],
    )
    now = timezone.now()
    for key, n, oldest in rows:
        value = bounded(f"{name}_{label}", key)
        count.add_metric([value], n)
        age.add_metric([value], max(0.0, (now - oldest).total_seconds()))
    return count, age


def _approval_gauges() -> Iterable[Metric]:
    from approvals.models import Approval

    pending = Approval.objects.filter(status=Approval.Status.PENDING)
    yield from _waiting(pending, "run__agent__slug", "agent", "approvals", "Approvals (reviews)")


def _outbox_gauges() -> Iterable[Metric]:
    from tools.models import OutboxMessage

    pending = OutboxMessage.objects.filter(status=OutboxMessage.Status.PENDING)
    yield from _waiting(pending, "kind", "kind", "outbox", "Side effects (not yet delivered)")


# kombu's Redis transport keeps a queue's priority levels in lists of their own.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)


def _queue_gauges() -> Iterable[Metric]:
    if not settings.CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
        return
    client = rediskeys.client(settings.CELERY_BROKER_URL)
    pipe = client.pipeline(transaction=False)
    queues = celery_queues()
    for queue in queues:
        for step in _PRIORITY_STEPS:
            name = queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}"
            pipe.llen(rediskeys.broker_key(name))
    pipe.hlen(rediskeys.broker_key("unacked"))
    replies = pipe.execute()
    depth = GaugeMetricFamily(
        "agentsite_celery_queue_length",
        "Messages waiting in a Celery queue (not yet taken by a worker).",
        labels=["queue"],
    )
    per = len(_PRIORITY_STEPS)
    for i, queue in enumerate(queues):
        depth.add_metric([queue], sum(int(n) for n in replies[i * per : (i + 1) * per]))
    yield depth
    yield GaugeMetricFamily(
        "agentsite_celery_unacked_messages",
        "Messages taken by workers and not yet acknowledged (running, or reserved by a "
        "worker's prefetch; a countdown waits here too).",
        value=int(replies[-1]),
    )


def _consumer_gauges() -> Iterable[Metric]:
    gauge = GaugeMetricFamily(
        "agentsite_queue_consumers",
        "Live workers consuming each queue (from their heartbeats); 0: its tasks wait.",
        labels=["queue"],
    )
    for queue, count in heartbeats.consumers().items():
        gauge.add_metric([queue], count)
    yield gauge


def _breaker_names() -> list[str]:
    from agents.models import Agent
    from agents.providers.routing import breaker_key
    from tools.registry import registry

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
    from agentsite import breaker

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


# --- Exposition -------------------------------------------------------------------------------


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def process_registry() -> CollectorRegistry:
    """This process's metrics; in multiprocess mode, those of every process sharing the dir."""
    if not multiprocess_dir():
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


_state_registry = CollectorRegistry(auto_describe=False)
_state_registry.register(StateCollector())


def exposition(*, state: bool) -> tuple[bytes, str]:
    """The text format for a scrape: this process's (or its service's) event metrics, and the
    state gauges when ``state``."""
    body = generate_latest(process_registry())
    if state:
        body += generate_latest(_state_registry)
    return body, CONTENT_TYPE_LATEST


def clear_multiprocess_dir() -> None:
    """A service starting in multiprocess mode begins with an empty directory (the files of its
    earlier life would be added in): call it once, before the processes that write there."""
    directory = multiprocess_dir()
    if not directory:
        return
    from pathlib import Path

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def process_gone(pid: int) -> None:
    """A process of a multiprocess service ended: its live gauges go (its counters stay)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve_worker_metrics() -> int | None:
    """Serve this worker's metrics over HTTP on AGENTSITE_WORKER_METRICS_PORT (0: any free
    port, logged); returns the port, or None when the setting is unset."""
    port = settings.AGENTSITE_WORKER_METRICS_PORT
    if port is None:
        return None
    from prometheus_client import start_http_server

    addr = settings.AGENTSITE_WORKER_METRICS_ADDR
    try:
        server, _ = start_http_server(port, addr=addr, registry=process_registry())
    except OSError as exc:  # the port is taken: the worker works on, without its endpoint
        logger.error(
            "worker metrics: cannot listen on %s:%s (%s); give each worker of a host its own "
            "AGENTSITE_WORKER_METRICS_PORT",
            addr,
            port,
            exc,
        )
        return None
    bound_port = int(server.server_port)
    logger.info("worker metrics at http://%s:%s/metrics", addr, bound_port)
    return bound_port
