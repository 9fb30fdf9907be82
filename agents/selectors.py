"""Reads that are more than a filter: the API's lists, usage and cost, operators' figures for
a window, and which work waits on a queue that no live worker consumes.

Usage is summed in one place (``usage_summary``) so that ``GET /api/v1/usage/`` and
``manage.py stats`` agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import (
    Aggregate,
    Case,
    Count,
    Exists,
    F,
    FloatField,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    When,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from agentsite import heartbeats
from approvals.models import Approval
from audittrail.models import AuditEvent

from .models import Agent, Run, Step

logger = logging.getLogger(__name__)

MODELS_QUEUE = "models"  # agents.advance_run: a queued run's first step, every model turn
TOOLS_QUEUE = "tools"  # tools.execute_tool_call
# A step in these states is in hand: executing on a worker, or held for a reviewer.
_IN_HAND = (Step.Status.RUNNING, Step.Status.AWAITING_APPROVAL)


@dataclass(frozen=True)
class UnservedQueue:
    """A queue of the project that no live worker consumes, and the runs that have waited on
    it for longer than ``AGENTSITE_QUEUE_NO_CONSUMER_AFTER`` (only ``models`` and ``tools``
    carry runs' steps)."""

    queue: str
    runs_waiting: int
    oldest: datetime | None

    def describe(self, now: datetime) -> str:
        if not self.runs_waiting or self.oldest is None:
            return f"no live worker consumes the queue {self.queue!r}"
        age = (now - self.oldest).total_seconds()
        return (
            f"{self.runs_waiting} run{'s' if self.runs_waiting != 1 else ''} "
            f"{'have' if self.runs_waiting != 1 else 'has'} waited up to {_age(age)} on the "
            f"queue {self.queue!r}, which no live worker consumes: start one "
            "(`celery -A agentsite worker` consumes every queue)"
        )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _threshold(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.AGENTSITE_QUEUE_NO_CONSUMER_AFTER)


def unserved_queues(*, now: datetime | None = None) -> list[UnservedQueue] | None:
    """The project's queues without a live consumer, each with the runs waiting on it past the
    threshold; None when the workers' heartbeats cannot be read (Redis down)."""
    now = now or timezone.now()
    try:
        consumers = heartbeats.consumers()
    except Exception as exc:
        logger.warning("worker heartbeats unreadable: %s", exc)
        return None
    unserved = [queue for queue, count in consumers.items() if count == 0]
    waiting: dict[str, dict[str, Any]] = {}
    before = _threshold(now)
    if MODELS_QUEUE in unserved:
        # Queued runs, and running ones whose next model turn is due: no step executing or
        # held for a reviewer, no tool call pending, no progress since before the threshold.
        busy = Step.objects.filter(run=OuterRef("pk"), status__in=_IN_HAND)
        tool_due = Step.objects.filter(
            run=OuterRef("pk"), kind=Step.Kind.TOOL, status=Step.Status.PENDING
        )
        last_done = (
            Step.objects.filter(run=OuterRef("pk"), finished_at__isnull=False)
            .order_by("-finished_at")
            .values("finished_at")[:1]
        )
        waiting[MODELS_QUEUE] = (
            Run.objects.filter(status__in=(Run.Status.QUEUED, Run.Status.RUNNING))
            .exclude(Q(status=Run.Status.RUNNING) & (Exists(busy) | Exists(tool_due)))
            .annotate(
                since=Case(
                    When(status=Run.Status.QUEUED, then=F("created_at")),
                    default=Coalesce(Subquery(last_done), "started_at", "created_at"),
                )
            )
            .filter(since__lt=before)
            .aggregate(runs=Count("pk"), oldest=Min("since"))
        )
    if TOOLS_QUEUE in unserved:
        waiting[TOOLS_QUEUE] = Step.objects.filter(
            kind=Step.Kind.TOOL,
            status=Step.Status.PENDING,
            created_at__lt=before,
            run__status=Run.Status.RUNNING,
        ).aggregate(runs=Count("run", distinct=True), oldest=Min("created_at"))
    return [
        UnservedQueue(
            queue,
            int(waiting.get(queue, {}).get("runs") or 0),
            waiting.get(queue, {}).get("oldest"),
        )
        for queue in sorted(unserved)
    ]


def waiting_on(run: Run, *, since_before: datetime) -> tuple[str, datetime] | None:
    """The queue ``run`` waits on and since when, if it has waited there since before
    ``since_before``: a queued run's first step (``models``), a tool call (``tools``)."""
    if run.status == Run.Status.QUEUED:
        return (MODELS_QUEUE, run.created_at) if run.created_at < since_before else None
    if run.status != Run.Status.RUNNING:
        return None
    open_steps = list(
        run.steps.filter(status__in=(*_IN_HAND, Step.Status.PENDING))
        .order_by("created_at")
        .values_list("kind", "status", "created_at")
    )
    if any(status in _IN_HAND for _, status, _ in open_steps):
        return None  # a worker (or a reviewer) has it in hand
    tools = [created for kind, _, created in open_steps if kind == Step.Kind.TOOL]
    if tools:
        return (TOOLS_QUEUE, tools[0]) if tools[0] < since_before else None
    # Its next model turn is due since its last step finished (or since it started).
    last_done = (
        run.steps.filter(finished_at__isnull=False)
        .order_by("-finished_at")
        .values_list("finished_at", flat=True)
        .first()
    )
    since = last_done or run.started_at or run.created_at
    return (MODELS_QUEUE, since) if since < since_before else None


def run_waits_unserved(run: Run, *, now: datetime | None = None, after: float | None = None) -> str:
    """Why ``run`` is not moving, if it has waited longer than ``after`` seconds (default
    ``AGENTSITE_QUEUE_NO_CONSUMER_AFTER``) on a queue no live worker consumes; "" otherwise
    (or when that cannot be told)."""
    now = now or timezone.now()
    wait = settings.AGENTSITE_QUEUE_NO_CONSUMER_AFTER if after is None else after
    found = waiting_on(run, since_before=now - timedelta(seconds=wait))
    if found is None:
        return ""
    queue, since = found
    try:
        served = heartbeats.consumers([queue])[queue]
    except Exception as exc:
        logger.warning("worker heartbeats unreadable: %s", exc)
        return ""
    if served:
        return ""
    return (
        f"This run has waited {_age((now - since).total_seconds())} on the queue {queue!r}, "
        "which no live worker consumes: start one (`celery -A agentsite worker` consumes "
        "every queue)."
    )


# --- The API's lists ------------------------------------------------------------------------


def listed_agents() -> QuerySet[Agent]:
    """The agents a caller may run: active, with a current version."""
    return (
        Agent.objects.filter(is_active=True, current_version__isnull=False)
        .select_related("current_version")
        .order_by("slug")
    )


def runs_of(owner: Any) -> QuerySet[Run]:
    """``owner``'s runs, with what their representation shows."""
    return Run.objects.filter(owner=owner).select_related("agent", "agent_version", "session")


def filter_runs(runs: QuerySet[Run], filters: dict[str, Any]) -> QuerySet[Run]:
    """``runs`` narrowed by the API's list filters (status, agent, created_after,
    created_before), newest first."""
    if "status" in filters:
        runs = runs.filter(status=filters["status"])
    if "agent" in filters:
        runs = runs.filter(agent__slug=filters["agent"])
    if "created_after" in filters:
        runs = runs.filter(created_at__gte=filters["created_after"])
    if "created_before" in filters:
        runs = runs.filter(created_at__lt=filters["created_before"])
    return runs.order_by("-created_at", "-pk")


def run_steps(run: Run) -> QuerySet[Step]:
    """Every step of ``run``, in order."""
    return run.steps.order_by("index")


def run_events(run_id: Any, after: int | None) -> QuerySet[AuditEvent]:
    """The run's audit events, oldest first, after the event ``after`` if given."""
    events = AuditEvent.objects.filter(run_id=run_id).order_by("id")
    return events.filter(id__gt=after) if after is not None else events


# --- Usage and cost -------------------------------------------------------------------------

USAGE_GROUPS = ("agent", "version", "api_key", "model")

_RUN_KEYS = {
    "agent": ("agent__slug",),
    "version": ("agent__slug", "agent_version__number"),
    "api_key": ("api_key__prefix", "api_key__name"),
}


def usage_summary(
    runs: QuerySet[Run],
    group_by: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """One row per group of ``runs`` created in [since, until): runs, how they ended, tokens
    and cost. ``model`` groups the model calls (steps) by the route that answered them."""
    if group_by not in USAGE_GROUPS:
        raise ValueError(f"group_by is one of {', '.join(USAGE_GROUPS)}")
    if since is not None:
        runs = runs.filter(created_at__gte=since)
    if until is not None:
        runs = runs.filter(created_at__lt=until)
    if group_by == "model":
        return _usage_by_model(runs)
    keys = _RUN_KEYS[group_by]
    rows = (
        runs.order_by()
        .values(*keys)
        .annotate(
            runs=Count("pk"),
            succeeded=Count("pk", filter=Q(status=Run.Status.SUCCEEDED)),
            failed=Count("pk", filter=Q(status=Run.Status.FAILED)),
            cancelled=Count("pk", filter=Q(status=Run.Status.CANCELLED)),
            input_tokens=Coalesce(Sum("input_tokens"), 0),
            output_tokens=Coalesce(Sum("output_tokens"), 0),
            cost=Coalesce(Sum("cost"), Decimal("0")),
        )
        .order_by(*keys)
    )
    return [_usage_row(group_by, row, keys) for row in rows]


def _usage_row(group_by: str, row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    if group_by == "agent":
        group = {"agent": row["agent__slug"]}
    elif group_by == "version":
        group = {"agent": row["agent__slug"], "version": row["agent_version__number"]}
    else:
        group = {"api_key": row["api_key__prefix"], "api_key_name": row["api_key__name"]}
    finished = row["succeeded"] + row["failed"]
    return {
        **group,
        "runs": row["runs"],
        "succeeded": row["succeeded"],
        "failed": row["failed"],
        "cancelled": row["cancelled"],
        # Of the runs that finished on their own (cancelled ones say nothing of the agent).
        "success_rate": round(row["succeeded"] / finished, 4) if finished else None,
        "input_tokens": row["input_tokens"],
        "output_tokens": row["output_tokens"],
        "cost": f"{row['cost']:.6f}",
        "cost_per_run": f"{row['cost'] / row['runs']:.6f}" if row["runs"] else "0.000000",
    }


def _usage_by_model(runs: QuerySet[Run]) -> list[dict[str, Any]]:
    rows = (
        Step.objects.filter(run__in=runs.values("pk"), kind=Step.Kind.MODEL)
        .exclude(model_route="")
        .order_by()
        .values("model_route")
        .annotate(
            calls=Count("pk", filter=Q(status=Step.Status.SUCCEEDED)),
            failed=Count("pk", filter=Q(status=Step.Status.FAILED)),
            runs=Count("run", distinct=True),
            input_tokens=Coalesce(Sum("input_tokens"), 0),
            output_tokens=Coalesce(Sum("output_tokens"), 0),
            cost=Coalesce(Sum("cost"), Decimal("0")),
        )
        .order_by("model_route")
    )
    return [
        {
            "model": row["model_route"],
            "runs": row["runs"],
            "calls": row["calls"],
            "failed_calls": row["failed"],
            "input_tokens": row["input_tokens"],
            "output_tokens": row["output_tokens"],
            "cost": f"{row['cost']:.6f}",
        }
        for row in rows
    ]


# --- Operators' figures for a window (manage.py stats) ---------------------------------------

# The windows an operator may ask for, shortest first.
WINDOWS = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "1d": timedelta(days=1),
    "7d": timedelta(days=7),
}
DEFAULT_WINDOWS = ("1h", "1d")
TOP_AGENTS = 20


class PercentileCont(Aggregate):
    """PostgreSQL's ``percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)``: the value
    at ``fraction`` of the ordered values, interpolated linearly between the two nearest ones
    (position ``fraction * (n - 1)``); NULL when there are no values."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: str, fraction: float) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError("a percentile's fraction is from 0 to 1")
        # A float we checked, written into the SQL as a literal (it is not a parameter there).
        super().__init__(expression, fraction=repr(float(fraction)))


def summarise_window(
    since: timedelta,
    *,
    now: datetime | None = None,
    agent: Agent | None = None,
    top_agents: int = TOP_AGENTS,
) -> dict[str, Any]:
    """The figures for the window [now - since, now), for every agent or for ``agent``.

    Runs (statuses, rates, tokens, cost) are the runs created in the window; step latency is
    over the steps that finished in it, whenever their run was created. Rates are fractions of
    the window's runs (None when it has none); costs are decimal strings; percentiles are
    milliseconds rounded to 0.1 (None when no step finished). Agents are listed by cost, the
    ``top_agents`` costliest, the rest summed in ``other_agents``.
    """
    until = now if now is not None else timezone.now()
    start = until - since
    runs = Run.objects.all() if agent is None else Run.objects.filter(agent=agent)
    counts = _run_counts(runs.filter(created_at__gte=start, created_at__lt=until))
    total = counts["total"]
    agents = _usage_by_agent(usage_summary(runs, "agent", since=start, until=until))
    return {
        "since": start,
        "until": until,
        "agent": agent.slug if agent is not None else None,
        "runs": {
            "total": total,
            "by_status": {status: counts[f"status_{status}"] for status in Run.Status.values},
        },
        "failed": _share(counts[f"status_{Run.Status.FAILED}"], total),
        "escalated": _share(counts["escalated"], total),
        "step_latency_ms": _step_latency(start, until, agent),
        "agents": agents[:top_agents],
        "other_agents": _summed(agents[top_agents:]) if agents[top_agents:] else None,
        "totals": _summed(agents),
    }


def _run_counts(runs: QuerySet[Run]) -> dict[str, int]:
    """One query: the runs, by status, and those with at least one approval (escalated)."""
    with_approval = Exists(Approval.objects.filter(run=OuterRef("pk")))
    result: dict[str, int] = runs.aggregate(
        total=Count("pk"),
        escalated=Count("pk", filter=with_approval),
        **{
            f"status_{status}": Count("pk", filter=Q(status=status)) for status in Run.Status.values
        },
    )
    return result


def _share(count: int, total: int) -> dict[str, Any]:
    return {"runs": count, "rate": round(count / total, 4) if total else None}


def _step_latency(start: datetime, until: datetime, agent: Agent | None) -> dict[str, Any]:
    """One query: per step kind, the steps with a latency that finished in [start, until), and
    their p50 and p95. Every kind is listed, with None percentiles when it has no steps."""
    steps = Step.objects.filter(
        finished_at__gte=start, finished_at__lt=until, latency_ms__isnull=False
    )
    if agent is not None:
        steps = steps.filter(run__agent=agent)
    if connection.vendor == "postgresql":
        rows = {
            row["kind"]: row
            for row in steps.order_by()
            .values("kind")
            .annotate(
                steps=Count("pk"),
                p50=PercentileCont("latency_ms", 0.5),
                p95=PercentileCont("latency_ms", 0.95),
            )
        }
    else:
        rows = _latency_rows_in_python(steps)
    latency: dict[str, Any] = {}
    for kind in Step.Kind.values:
        row = rows.get(kind, {"steps": 0, "p50": None, "p95": None})
        latency[kind] = {
            "steps": row["steps"],
            "p50": _ms(row["p50"]),
            "p95": _ms(row["p95"]),
        }
    return latency


def _latency_rows_in_python(steps: QuerySet[Step]) -> dict[str, dict[str, Any]]:
    """The same figures for a database without percentile_cont (the embedded SQLite of make
    demo): the latencies are read, one query, and interpolated as percentile_cont does."""
    latencies: dict[str, list[float]] = {}
    for kind, latency in steps.order_by("latency_ms").values_list("kind", "latency_ms"):
        if latency is not None:  # the queryset has only steps with one
            latencies.setdefault(kind, []).append(float(latency))
    return {
        kind: {
            "steps": len(values),
            "p50": percentile_cont(values, 0.5),
            "p95": percentile_cont(values, 0.95),
        }
        for kind, values in latencies.items()
    }


def percentile_cont(ordered: list[float], fraction: float) -> float | None:
    """Postgres's percentile_cont over already ordered values: the value at position
    ``fraction * (n - 1)``, interpolated linearly between its neighbours; None for none."""
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _usage_by_agent(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [
        {
            "agent": group["agent"],
            "runs": group["runs"],
            "input_tokens": group["input_tokens"],
            "output_tokens": group["output_tokens"],
            "cost": group["cost"],
        }
        for group in groups
    ]
    # Costliest first; ties by slug so the order (and the cut at top_agents) is stable.
    rows.sort(key=lambda row: (-Decimal(row["cost"]), row["agent"]))
    return rows


def _summed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "agents": len(rows),
        "runs": sum(row["runs"] for row in rows),
        "input_tokens": sum(row["input_tokens"] for row in rows),
        "output_tokens": sum(row["output_tokens"] for row in rows),
        "cost": f"{sum((Decimal(row['cost']) for row in rows), Decimal('0')):.6f}",
    }
