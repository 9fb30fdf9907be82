"""Usage and cost summed per agent, agent version, API key or model: one aggregate query.

The API (``GET /api/v1/usage/``), ``manage.py stats`` (tokens and cost by agent) and the admin's
version comparison all read it, so the figures agree wherever they are looked at.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce

from .models import Run, Step

GROUPS = ("agent", "version", "api_key", "model")

_RUN_KEYS = {
    "agent": ("agent__slug",),
    "version": ("agent__slug", "agent_version__number"),
    "api_key": ("api_key__prefix", "api_key__name"),
}


def summarise(
    runs: QuerySet[Run],
    group_by: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """One row per group of ``runs`` created in [since, until): runs, how they ended, tokens
    and cost. ``model`` groups the model calls (steps) by the route that answered them."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by is one of {', '.join(GROUPS)}")
    if since is not None:
        runs = runs.filter(created_at__gte=since)
    if until is not None:
        runs = runs.filter(created_at__lt=until)
    if group_by == "model":
        return _by_model(runs)
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
    return [_row(group_by, row, keys) for row in rows]


def _row(group_by: str, row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
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


def _by_model(runs: QuerySet[Run]) -> list[dict[str, Any]]:
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
