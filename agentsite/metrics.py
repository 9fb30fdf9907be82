"""Prometheus metrics: the registry each app adds its metrics to, the HTTP and Celery metrics,
and the exposition.

Two kinds, kept apart so that no figure is counted twice when several processes are scraped:

- **Event metrics** (counters and histograms) live in the process where the event happened:
  runs submitted in the web process, steps and their tokens, cost, retries and deferrals in
  the worker that performed them. Most are counted from the audit trail: ``observe`` is called
  by ``audittrail.writer.record`` once the transaction that wrote the event commits, so a
  rolled-back change or a claim lost to another worker is never counted; an app says which
  audit actions it counts, and how, with ``count_events``. Sum them across processes
  (``sum by (...)``).
- **State metrics** (gauges: active runs, pending approvals and their age, Celery queue
  depth, circuit-breaker states) are read from Postgres and Redis when ``/metrics`` of the web
  process is scraped (``StateCollector``, over the readers apps add with ``collect_state``);
  workers do not repeat them.

Each app registers its own (``agents.metrics``, ``tools.metrics``, ``approvals.metrics``, from
their ``AppConfig.ready``): this module imports no app.

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
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Count, Min, QuerySet
from django.utils import timezone
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
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

TASK_WAIT = Histogram(
    "agentsite_task_wait_seconds",
    "Time a Celery message waited between being due (published, or its countdown over) and a "
    "worker starting it, by task: the queue's latency as the work sees it.",
    ["task"],
    buckets=STEP_BUCKETS,
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


_agent_slugs: dict[int, str] = {}


def _no_slug(agent_id: int) -> str | None:
    return None


# How to find an agent's slug by its id: set by the agents app (agents.metrics).
_slug_of: Callable[[int], str | None] = _no_slug


def read_agent_slugs_with(lookup: Callable[[int], str | None]) -> None:
    """Tell ``agent_slug`` how to read a slug it has not cached (the agents app does)."""
    global _slug_of
    _slug_of = lookup


def agent_slug(agent_id: int | None, *, loaded: Any = None) -> str:
    """The agent's slug (cached per process: a slug is an agent's name, and rarely changes);
    ``loaded`` is the agent when the caller has it already (no query then)."""
    if agent_id is None:
        return ""
    slug = _agent_slugs.get(agent_id)
    if slug is None and loaded is not None and len(_agent_slugs) < 10_000:
        slug = _agent_slugs[agent_id] = loaded.slug
    if slug is None:
        try:
            slug = _slug_of(agent_id)
        except Exception:  # a metric or a log line is never worth failing the caller
            return f"#{agent_id}"
        slug = slug or f"#{agent_id}"
        if len(_agent_slugs) < 10_000:
            _agent_slugs[agent_id] = slug
    return slug


def agent_label(agent_id: int | None) -> str:
    return bounded("agent", agent_slug(agent_id))


# --- Events, from the audit trail -------------------------------------------------------------

# Counts one committed audit event: (action, agent id, payload).
EventObserver = Callable[[str, int | None, dict[str, Any]], None]
_observers: dict[str, EventObserver] = {}


def count_events(actions: Iterable[str], observer: EventObserver) -> None:
    """Have ``observer`` count each committed audit event of one of ``actions`` (an app's
    ``AuditAction`` members); an action has one observer, the last registered."""
    for action in actions:
        _observers[str(action)] = observer


def counts(action: str) -> bool:
    """Whether an audit event of ``action`` moves a metric."""
    return action in _observers


def observe(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    """Count one committed audit event. Never raises: a metric must not fail a step."""
    observer = _observers.get(action)
    if observer is None:
        return
    try:
        observer(action, agent_id, payload)
    except Exception:
        logger.exception("metrics: could not count %s", action)


SENT_HEADER = "agentsite_sent_at"  # when a message was published (epoch seconds)


def task_started(task: Any) -> None:
    """A worker starts a message: how long it waited since it was due (published, or its
    countdown over). Messages published by other programs carry no time and are not counted."""
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


# Reads a source at scrape time; its metrics are left out of a scrape when it fails.
StateReader = Callable[[], Iterable[Metric]]
_state_readers: dict[str, StateReader] = {}


def collect_state(read: StateReader) -> None:
    """Read ``read``'s gauges at each scrape of the web process (once per function)."""
    _state_readers[f"{read.__module__}.{read.__qualname__}"] = read


class StateCollector(Collector):
    """Gauges read from Postgres and Redis at scrape time. A source that cannot be read is
    left out of this scrape (and logged) rather than failing the whole scrape."""

    def collect(self) -> Iterator[Metric]:
        for read in list(_state_readers.values()):
            try:
                yield from read()
            except Exception as exc:
                logger.warning(
                    "metrics: %s unavailable: %s: %s", read.__name__, type(exc).__name__, exc
                )


def waiting_gauges(
    pending: QuerySet[Any], by: str, label: str, name: str, what: str
) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """``agentsite_<name>_pending`` and ``..._oldest_pending_age_seconds`` of the rows of
    ``pending`` (a queryset with ``created_at``), grouped by the field ``by``: one query."""
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


collect_state(_queue_gauges)
collect_state(_consumer_gauges)


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
