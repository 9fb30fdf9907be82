"""Holding actions for a reviewer and applying decisions: the only code that changes approvals.

A held tool call is a step in ``awaiting_approval`` with an ``Approval`` bound to the exact
action proposed (a digest of tool and arguments). A decision is taken once, under the run's
lock: approving (possibly with edited arguments, validated like the original) turns the step
into a pending call bound to the approved digest, which the executor checks before it runs the
tool; rejecting tells the model the call was rejected and why. The run resumes on a worker
when its last held call is decided.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from agents import audit
from agents.dispatch import advance_run_on_commit, tool_call_on_commit
from agents.models import Run, Step

from .models import Approval, action_digest

if TYPE_CHECKING:
    from django.contrib.auth.models import User


class DecisionError(Exception):
    """A decision that cannot be taken; ``field`` names the input at fault, if any."""

    code = "invalid_decision"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AlreadyDecided(DecisionError):
    code = "already_decided"


class ApprovalNotFound(DecisionError):
    code = "not_found"


DECISIONS = ("approve", "reject", "edit")


def request_tool_approval(run: Run, step: Step) -> Approval:
    """Hold ``step`` (already ``awaiting_approval``) for a reviewer. Inside the engine's
    transaction, under the run's lock."""
    arguments = step.request.get("arguments")
    approval = Approval.objects.create(
        run=run,
        step_index=step.index,
        reason=Approval.Reason.TOOL_REQUIRES_APPROVAL,
        tool_name=step.tool_name,
        proposed_arguments=arguments,
        proposed_digest=action_digest(step.tool_name, arguments),
    )
    audit.record(
        "approval.requested",
        run=run,
        step_index=step.index,
        payload={
            "approval": str(approval.pk),
            "reason": approval.reason,
            "tool": step.tool_name,
            "digest": approval.proposed_digest,
        },
    )
    return approval


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
            "approval.cancelled",
            run=run,
            step_index=step_index,
            by=by,
            payload={"approval": str(pk), "why": f"the run is {run.status}"},
        )
    return len(pending)


def decide(
    approval_id: UUID | str,
    *,
    decision: str,
    user: User | None,
    arguments: Any = None,
    comment: str = "",
) -> Approval:
    """Approve, edit-then-approve or reject a held tool call, exactly once.

    ``edit`` runs the tool with ``arguments`` instead of the proposal; they are checked exactly
    like the model's (schema and grant constraints). ``reject`` needs a comment; the model reads
    it. Raises AlreadyDecided if someone decided first, DecisionError on bad input.
    """
    from tools import policy

    if decision not in DECISIONS:
        raise DecisionError(f"decision is one of {', '.join(DECISIONS)}", field="decision")
    comment = (comment or "").strip()
    if decision == "reject" and not comment:
        raise DecisionError("a rejection needs a comment saying why", field="comment")
    if decision == "edit" and not isinstance(arguments, dict):
        raise DecisionError("edit needs the arguments to run, as a JSON object", field="arguments")
    with transaction.atomic():
        found = Approval.objects.filter(pk=approval_id).values_list("run_id", flat=True).first()
        if found is None:
            raise ApprovalNotFound("no such approval")
        run = (
            Run.objects.select_for_update(of=("self",))
            .select_related("agent_version")
            .get(pk=found)
        )
        approval = Approval.objects.select_for_update().get(pk=approval_id)
        if approval.status != Approval.Status.PENDING:
            who = f" by {approval.decided_by}" if approval.decided_by else ""
            raise AlreadyDecided(f"this approval was already {approval.status}{who}")
        step = Step.objects.get(run=run, index=approval.step_index)
        actor = audit.Actor.user(user, otherwise="reviewer")
        now = timezone.now()
        if decision == "reject":
            Approval.objects.filter(pk=approval.pk).update(
                status=Approval.Status.REJECTED, decided_by=user, decided_at=now, comment=comment
            )
            held = Step.objects.filter(pk=step.pk, status=Step.Status.AWAITING_APPROVAL).update(
                status=Step.Status.REFUSED,
                error=f"a human reviewer rejected this call: {comment}",
                finished_at=now,
            )
            if not held:
                raise DecisionError(f"the call is no longer waiting for review ({step.status})")
            audit.record(
                "approval.rejected",
                run=run,
                step_index=step.index,
                by=actor,
                payload={"approval": str(approval.pk), "tool": step.tool_name, "comment": comment},
            )
        else:
            final = arguments if decision == "edit" else approval.proposed_arguments
            verdict = policy.authorize(run, step.tool_name, final)
            if verdict.refusal:
                raise DecisionError(
                    verdict.refusal, field="arguments" if decision == "edit" else None
                )
            assert verdict.spec is not None
            request = {"arguments": final, "approval": str(approval.pk)}
            if decision == "edit":
                request["proposed_arguments"] = approval.proposed_arguments
            held = Step.objects.filter(pk=step.pk, status=Step.Status.AWAITING_APPROVAL).update(
                status=Step.Status.PENDING, request=request
            )
            if not held:
                raise DecisionError(f"the call is no longer waiting for review ({step.status})")
            # The digest of the arguments as stored (jsonb may normalise numbers): exactly what
            # the executor will read back and check.
            step.refresh_from_db(fields=["request"])
            final = step.request["arguments"]
            digest = action_digest(step.tool_name, final)
            Approval.objects.filter(pk=approval.pk).update(
                status=Approval.Status.APPROVED,
                approved_arguments=final,
                approved_digest=digest,
                decided_by=user,
                decided_at=now,
                comment=comment,
            )
            audit.record(
                "approval.approved",
                run=run,
                step_index=step.index,
                by=actor,
                payload={
                    "approval": str(approval.pk),
                    "tool": step.tool_name,
                    "edited": decision == "edit" and final != approval.proposed_arguments,
                    "digest": digest,
                    "comment": comment,
                },
            )
            tool_call_on_commit(run.pk, step.index, timeout=verdict.spec.timeout)
        _resume_if_nothing_held(run, actor)
        approval.refresh_from_db()
        return approval


def _resume_if_nothing_held(run: Run, actor: audit.Actor) -> None:
    from agents.engine import resume_after_review

    held = Step.objects.filter(run=run, status=Step.Status.AWAITING_APPROVAL).exists()
    if not held and resume_after_review(run, by=actor):
        advance_run_on_commit(run.pk)  # a no-op while approved calls are still running
