"""Reads that are more than a filter: which work waits on a queue that no live worker consumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Case, Count, Exists, F, Min, OuterRef, Q, Subquery, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from agentsite import heartbeats

from .models import Run, Step

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
