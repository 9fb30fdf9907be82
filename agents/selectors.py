"""Reads that are more than a filter: which work waits on a queue that no live worker consumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Min
from django.utils import timezone

from agentsite import heartbeats

from .models import Run, Step

logger = logging.getLogger(__name__)

MODELS_QUEUE = "models"  # agents.advance_run: a queued run's first step, every model turn
TOOLS_QUEUE = "tools"  # tools.execute_tool_call


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
        waiting[MODELS_QUEUE] = Run.objects.filter(
            status=Run.Status.QUEUED, created_at__lt=before
        ).aggregate(runs=Count("pk"), oldest=Min("created_at"))
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
    pending = (
        run.steps.filter(
            kind=Step.Kind.TOOL, status=Step.Status.PENDING, created_at__lt=since_before
        )
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    return (TOOLS_QUEUE, pending) if pending is not None else None


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
