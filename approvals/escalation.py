"""Escalating to a human: the approvals the engine creates when it holds a run or a call for a
reviewer, and the ones it cancels when the run ends. The engine calls these inside its own
transaction, under the run's lock; deciding them is ``approvals.services``."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from agents.models import Run, Step
from audittrail import writer as audit
from audittrail.actions import AuditAction

from .models import Approval, action_digest, output_digest

MAX_SLA_MINUTES = 60 * 24 * 365
CONTEXT_STEPS = 6
CONTEXT_TEXT_CHARS = 2000
PRIORITY_NAMES = {label: value for value, label in Approval.Priority.choices}


def _clip(value: Any) -> Any:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= CONTEXT_TEXT_CHARS else text[:CONTEXT_TEXT_CHARS] + "…"


def _context(run: Run) -> dict[str, Any]:
    """What a reviewer reads: who asked what, and what the agent did last."""
    steps = list(run.steps.order_by("-index")[:CONTEXT_STEPS])
    return {
        "agent": run.agent.slug,
        "agent_version": run.agent_version.number,
        "model_route": run.model_route,
        "input": run.input,
        "submitted_by": run.owner.get_username() if run.owner else "",
        "steps": [
            {
                "index": s.index,
                "kind": s.kind,
                "status": s.status,
                "tool": s.tool_name,
                "arguments": (s.request or {}).get("arguments") if s.kind == "tool" else None,
                "text": _clip((s.response or {}).get("text") if s.kind == "model" else s.response)
                if s.response is not None
                else None,
                "error": s.error,
            }
            for s in reversed(steps)
        ],
    }


def sla(run: Run) -> timedelta:
    minutes = run.agent_version.policy.get(
        "review_sla_minutes", settings.AGENTSITE_REVIEW_SLA_MINUTES
    )
    try:
        return timedelta(minutes=min(max(1.0, float(minutes)), MAX_SLA_MINUTES))
    except (TypeError, ValueError, OverflowError):
        return timedelta(minutes=settings.AGENTSITE_REVIEW_SLA_MINUTES)


def _priority(run: Run, reason: str) -> int:
    policy = run.agent_version.policy
    by_reason = policy.get("priorities") if isinstance(policy.get("priorities"), dict) else {}
    name = (by_reason or {}).get(reason) or policy.get("priority") or "normal"
    return PRIORITY_NAMES.get(str(name), Approval.Priority.NORMAL)


def escalate(
    run: Run,
    *,
    step_index: int,
    reason: str,
    detail: str = "",
    tool_name: str = "",
    arguments: Any = None,
    output: Any = None,
) -> Approval:
    """Create a pending approval (inside the engine's transaction, under the run's lock) and
    audit it. The caller moves the run to ``waiting_approval``."""
    is_tool = reason in Approval.TOOL_REASONS
    approval = Approval.objects.create(
        run=run,
        step_index=step_index,
        reason=reason,
        detail=detail,
        priority=_priority(run, reason),
        due_at=timezone.now() + sla(run),
        context=_context(run),
        tool_name=tool_name,
        proposed_arguments=arguments if is_tool else {},
        proposed_output=None if is_tool else output,
        proposed_digest=action_digest(tool_name, arguments) if is_tool else output_digest(output),
    )
    audit.record(
        AuditAction.APPROVAL_REQUESTED,
        run=run,
        step_index=step_index,
        payload={
            "approval": str(approval.pk),
            "reason": reason,
            "detail": detail,
            "tool": tool_name,
            "digest": approval.proposed_digest,
            "priority": approval.get_priority_display(),
            "due_at": approval.due_at.isoformat() if approval.due_at else None,
        },
    )
    return approval


def request_tool_approval(run: Run, step: Step, *, reason: str = "", detail: str = "") -> Approval:
    """Hold ``step`` (already ``awaiting_approval``) for a reviewer."""
    return escalate(
        run,
        step_index=step.index,
        reason=reason or Approval.Reason.TOOL_REQUIRES_APPROVAL,
        detail=detail or f"the agent's grant of {step.tool_name} requires approval",
        tool_name=step.tool_name,
        arguments=step.request.get("arguments"),
    )


def cancel_pending_approvals(run: Run, *, by: audit.Actor = audit.ENGINE) -> int:
    """The run ended: its open approvals can no longer be decided."""
    pending = list(
        Approval.objects.filter(run=run, status=Approval.Status.PENDING).values_list(
            "pk", "step_index"
        )
    )
    if not pending:
        return 0
    Approval.objects.filter(pk__in=[pk for pk, _ in pending]).update(
        status=Approval.Status.CANCELLED, decided_at=timezone.now()
    )
    for pk, step_index in pending:
        audit.record(
            AuditAction.APPROVAL_CANCELLED,
            run=run,
            step_index=step_index,
            by=by,
            payload={"approval": str(pk), "why": f"the run is {run.status}"},
        )
    return len(pending)


def budget_allowance(run: Run) -> int:
    """How many budgets the run has: 1, plus one per approved budget escalation."""
    return (
        1
        + Approval.objects.filter(
            run=run, reason=Approval.Reason.BUDGET_EXHAUSTED, status=Approval.Status.APPROVED
        ).count()
    )


def has_pending(run: Run) -> bool:
    return Approval.objects.filter(run=run, status=Approval.Status.PENDING).exists()
