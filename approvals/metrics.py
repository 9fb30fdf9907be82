"""The review queue's metrics: reviews requested and ended, counted from the audit trail, and
approvals pending, read when scraped (agentsite.metrics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import Metric

from agentsite import metrics
from agentsite.metrics import agent_label, bounded
from audittrail.actions import APPROVAL_DECIDED, AuditAction

from .models import Approval

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


def _requested(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    APPROVALS_REQUESTED.labels(
        agent_label(agent_id), bounded("reason", payload.get("reason"))
    ).inc()


def _decided(action: str, agent_id: int | None, payload: dict[str, Any]) -> None:
    outcome = action.partition(".")[2]
    if action == AuditAction.APPROVAL_APPROVED and payload.get("edited"):
        outcome = "edited"
    APPROVALS_DECIDED.labels(agent_label(agent_id), outcome).inc()


def _approval_gauges() -> Iterable[Metric]:
    pending = Approval.objects.filter(status=Approval.Status.PENDING)
    yield from metrics.waiting_gauges(
        pending, "run__agent__slug", "agent", "approvals", "Approvals (reviews)"
    )


def register() -> None:
    """Add this app's metrics to agentsite.metrics (ApprovalsConfig.ready)."""
    metrics.count_events([AuditAction.APPROVAL_REQUESTED], _requested)
    metrics.count_events(APPROVAL_DECIDED, _decided)
    metrics.collect_state(_approval_gauges)
