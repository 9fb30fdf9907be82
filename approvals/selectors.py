"""Reads of the review queue: the API's list and its filters, the admin's, and a run's pending
escalations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone

from agents.models import Agent, Run

from .models import Approval


def approvals() -> QuerySet[Approval]:
    """Every escalation, with what its representation shows."""
    return Approval.objects.select_related("run", "run__agent", "decided_by")


def overdue(now: datetime | None = None) -> Q:
    """Overdue: still pending after its due time."""
    return Q(status=Approval.Status.PENDING, due_at__lt=now or timezone.now())


def queue(
    escalations: QuerySet[Approval],
    *,
    status: str | None = None,
    agent: str | None = None,
    reason: str | None = None,
    priority: int | None = None,
    is_overdue: bool | None = None,
) -> QuerySet[Approval]:
    """``escalations`` narrowed by the queue's filters (None: not filtered), most urgent first,
    then the soonest due, then the oldest."""
    if status is not None:
        escalations = escalations.filter(status=status)
    if agent is not None:
        escalations = escalations.filter(run__agent__slug=agent)
    if reason is not None:
        escalations = escalations.filter(reason=reason)
    if priority is not None:
        escalations = escalations.filter(priority=priority)
    if is_overdue is not None:
        late = overdue()
        escalations = escalations.filter(late) if is_overdue else escalations.exclude(late)
    return escalations.order_by("-priority", "due_at", "created_at", "pk")


def agents_with_escalations() -> list[str]:
    """The slugs of the agents that have had an escalation, for the admin's filter."""
    return list(
        Agent.objects.filter(runs__approvals__isnull=False)
        .distinct()
        .order_by("slug")
        .values_list("slug", flat=True)
    )


def run_for_review(run_id: Any) -> Run:
    """The escalation's run, with what its review page shows."""
    return Run.objects.select_related("agent", "agent_version", "owner").get(pk=run_id)


def pending_for_run(run: Run, *, limit: int) -> list[Approval]:
    """The run's escalations waiting for a reviewer, oldest first, at most ``limit``."""
    waiting = Approval.objects.filter(run=run, status=Approval.Status.PENDING)
    return list(waiting.order_by("created_at")[:limit])
