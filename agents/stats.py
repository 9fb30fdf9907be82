"""Operators' figures for a recent window: runs by status, failure and escalation rates, step
latency percentiles and usage per agent. A few aggregate queries; no rows are loaded one by one.

``manage.py stats`` prints them. Usage per agent comes from ``agents.usage`` so the figures agree
with ``GET /api/v1/usage/``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection
from django.db.models import Aggregate, Count, Exists, FloatField, OuterRef, Q, QuerySet
from django.utils import timezone

from approvals.models import Approval

from . import usage
from .models import Agent, Run, Step

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
    agents = _usage_by_agent(usage.summarise(runs, "agent", since=start, until=until))
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
