"""Escalating to a human and applying decisions: the only code that changes approvals.

An approval holds one thing for a reviewer: a tool call (its step is ``awaiting_approval``), or
the run's answer or its budget (the model turn is done; the run is ``waiting_approval``). It
carries the reason, the exact proposal with its digest, the context a reviewer needs, a priority
and a due time. A decision is taken once, under the run's lock, by a user allowed to decide
(the ``approvals.decide_approval`` permission, and never on a run they submitted unless
``AGENTSITE_ALLOW_SELF_APPROVAL``), and the run resumes on a worker when nothing else is held:

===================== ====================================== ==================================
reason                approve / edit                          reject
===================== ====================================== ==================================
tool requires         the call runs with the proposed /      the model is told it was rejected,
approval              edited arguments (validated like the   with the comment
                      model's); bound to their digest
model requested       the model reads the reviewer's         the model reads that no help came,
(escalate_to_human)   comment and answer                     and why
low confidence,       the run succeeds with the proposed /   the run fails
output invalid        edited answer (checked against the     (``rejected_by_reviewer``)
                      agent's output schema)
budget exhausted      approve: the run gets another budget;  the run fails (``budget_exceeded``)
                      edit: it succeeds with the answer
===================== ====================================== ==================================
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agents.dispatch import tool_call_on_commit
from agents.engine import transitions
from agents.engine.requests import ToolStepRequest
from agents.errorcodes import RunErrorCode
from agents.jsonsafe import unstorable
from agents.models import Run, Step
from agents.outputs import OutputInvalid, check_output
from audittrail import writer as audit
from audittrail.actions import AuditAction
from tools import policy

from .escalation import sla
from .exceptions import AlreadyDecided, ApprovalNotFound, DecisionError, NotAllowedToDecide
from .models import Approval, Decision, action_digest, output_digest

DECISIONS = tuple(d.value for d in Decision)


# --- Deciding --------------------------------------------------------------------------------


def can_decide(user: Any) -> bool:
    return bool(user is not None and user.is_active and user.has_perm("approvals.decide_approval"))


def check_reviewer(user: Any, run: Run) -> None:
    """Raise NotAllowedToDecide unless ``user`` may decide on ``run`` (four-eyes included)."""
    if not can_decide(user):
        raise NotAllowedToDecide("you are not allowed to decide escalations (reviewers only)")
    assert user is not None
    own_run = run.owner_id is not None and run.owner_id == user.pk
    if own_run and not settings.AGENTSITE_ALLOW_SELF_APPROVAL:
        raise NotAllowedToDecide(
            "you submitted this run: another reviewer must decide (four-eyes rule)"
        )


def decide(
    approval_id: UUID | str,
    *,
    decision: str,
    user: Any,
    arguments: Any = None,
    output: Any = None,
    comment: str = "",
    system: str = "",
    expired: bool = False,
) -> Approval:
    """Approve, edit-then-approve or reject an escalation, exactly once (see the module doc).

    ``user`` must be allowed to decide (``check_reviewer``); ``system`` names a system actor
    instead (e.g. the expiry sweep) and skips that check. Raises AlreadyDecided if someone
    decided first, NotAllowedToDecide, or DecisionError on bad input (nothing changes then).
    """
    if decision not in DECISIONS:
        raise DecisionError(f"decision is one of {', '.join(DECISIONS)}", field="decision")
    comment = (comment or "").strip() if isinstance(comment, str) else ""
    if decision == Decision.REJECT and not comment:
        raise DecisionError("a rejection needs a comment saying why", field="comment")
    expired = expired and bool(system)
    for field, value in (("comment", comment), ("arguments", arguments), ("output", output)):
        problem = unstorable(value)
        if problem:
            raise DecisionError(f"{field} {problem}", field=field)
    with transaction.atomic():
        run_id = Approval.objects.filter(pk=approval_id).values_list("run_id", flat=True).first()
        if run_id is None:
            raise ApprovalNotFound("no such approval")
        run = transitions.lock_run(run_id, related=("agent_version", "agent"))
        assert run is not None  # an approval's run is never deleted while the approval lives
        approval = Approval.objects.select_for_update().get(pk=approval_id)
        if not system:
            check_reviewer(user, run)
        if approval.status != Approval.Status.PENDING:
            who = f" by {approval.decided_by}" if approval.decided_by else ""
            raise AlreadyDecided(f"this escalation was already {approval.status}{who}")
        actor = audit.Actor.system(system) if system else audit.Actor.user(user)
        decider = None if system else user
        if approval.is_about_a_tool_call and approval.reason == Approval.Reason.MODEL_REQUESTED:
            _answer_the_model(run, approval, decision, output, comment, decider, actor, expired)
        elif approval.is_about_a_tool_call:
            _decide_tool_call(run, approval, decision, arguments, comment, decider, actor, expired)
        else:
            _decide_answer(run, approval, decision, output, comment, decider, actor, expired)
        if not run.is_final:
            transitions.resume_after_review(run, by=actor)
        approval.refresh_from_db()
        return approval


def _rejected(expired: bool) -> str:
    return Approval.Status.EXPIRED if expired else Approval.Status.REJECTED


def _held_step(run: Run, approval: Approval) -> Step:
    step = Step.objects.get(run=run, index=approval.step_index)
    if step.status != Step.Status.AWAITING_APPROVAL:
        raise DecisionError(f"the call is no longer waiting for review ({step.status})")
    return step


def _mark(approval: Approval, status: str, user: Any, comment: str, **fields: Any) -> None:
    Approval.objects.filter(pk=approval.pk).update(
        status=status, decided_by=user, decided_at=timezone.now(), comment=comment, **fields
    )


def _decide_tool_call(
    run: Run,
    approval: Approval,
    decision: str,
    arguments: Any,
    comment: str,
    user: Any,
    actor: audit.Actor,
    expired: bool = False,
) -> None:
    step = _held_step(run, approval)
    if decision == Decision.REJECT:
        transitions.refuse_held_call(
            step,
            error=(
                f"no reviewer decided on this call in time ({comment})"
                if expired
                else f"a human reviewer rejected this call: {comment}"
            ),
        )
        _mark(approval, _rejected(expired), user, comment)
        audit.record(
            AuditAction.approval_decided(_rejected(expired)),
            run=run,
            step_index=step.index,
            by=actor,
            payload={"approval": str(approval.pk), "tool": step.tool_name, "comment": comment},
        )
        return
    if decision == Decision.EDIT and not isinstance(arguments, dict):
        raise DecisionError("edit needs the arguments to run, as a JSON object", field="arguments")
    final = arguments if decision == Decision.EDIT else approval.proposed_arguments
    verdict = policy.authorize(run, step.tool_name, final, step_index=step.index)
    if verdict.refusal:
        raise DecisionError(
            verdict.refusal, field="arguments" if decision == Decision.EDIT else None
        )
    assert verdict.spec is not None
    request = ToolStepRequest(arguments=final, approval=str(approval.pk))
    if decision == Decision.EDIT:  # what the model proposed is kept beside what runs
        request = replace(request, proposed_arguments=approval.proposed_arguments)
    transitions.release_held_call(step, request)
    # The digest of the arguments as stored (jsonb may normalise numbers): exactly what the
    # executor will read back and check.
    final = ToolStepRequest.of(step).arguments
    digest = action_digest(step.tool_name, final)
    _mark(
        approval,
        Approval.Status.APPROVED,
        user,
        comment,
        approved_arguments=final,
        approved_digest=digest,
    )
    audit.record(
        AuditAction.APPROVAL_APPROVED,
        run=run,
        step_index=step.index,
        by=actor,
        payload={
            "approval": str(approval.pk),
            "tool": step.tool_name,
            "edited": decision == Decision.EDIT and final != approval.proposed_arguments,
            "arguments": final,
            "digest": digest,
            "comment": comment,
        },
    )
    tool_call_on_commit(run.pk, step.index, timeout=verdict.spec.timeout)


def _answer_the_model(
    run: Run,
    approval: Approval,
    decision: str,
    output: Any,
    comment: str,
    user: Any,
    actor: audit.Actor,
    expired: bool = False,
) -> None:
    """escalate_to_human: the reviewer's reply is the tool's result; the model goes on."""
    step = _held_step(run, approval)
    reply: dict[str, Any] = {
        "reviewer_decision": "rejected" if decision == Decision.REJECT else "approved",
        "comment": comment,
    }
    if decision == Decision.EDIT:
        if output in (None, ""):
            raise DecisionError("edit needs the answer to give the agent", field="output")
        reply["answer"] = output
    if expired:
        reply["reviewer_decision"] = "expired"
    transitions.answer_held_call(step, reply)
    status = _rejected(expired) if decision == Decision.REJECT else Approval.Status.APPROVED
    _mark(approval, status, user, comment, approved_output=reply.get("answer"))
    audit.record(
        AuditAction.approval_decided(status),
        run=run,
        step_index=step.index,
        by=actor,
        payload={"approval": str(approval.pk), "reason": approval.reason, "comment": comment},
    )


def validate_output(run: Run, output: Any) -> Any:
    """The answer as the run would return it, or DecisionError if it fails the agent's output
    schema (the same check the engine makes)."""
    try:
        return check_output(run.agent_version.output_schema, output)
    except OutputInvalid as exc:
        raise DecisionError(f"the answer does not match the output schema: {exc}", field="output")


def _decide_answer(
    run: Run,
    approval: Approval,
    decision: str,
    output: Any,
    comment: str,
    user: Any,
    actor: audit.Actor,
    expired: bool = False,
) -> None:
    payload: dict[str, Any] = {
        "approval": str(approval.pk),
        "reason": approval.reason,
        "comment": comment,
    }
    if decision == Decision.REJECT:
        _mark(approval, _rejected(expired), user, comment)
        audit.record(
            AuditAction.approval_decided(_rejected(expired)),
            run=run,
            step_index=approval.step_index,
            by=actor,
            payload=payload,
        )
        if expired:
            code, error = RunErrorCode.REVIEW_EXPIRED, f"no reviewer decided in time ({comment})"
        elif approval.reason == Approval.Reason.BUDGET_EXHAUSTED:
            code, error = RunErrorCode.BUDGET_EXCEEDED, f"a reviewer refused more budget: {comment}"
        else:
            code, error = RunErrorCode.REJECTED_BY_REVIEWER, f"a reviewer rejected it: {comment}"
        transitions.finish_run(run, Run.Status.FAILED, error_code=code, error=error, by=actor)
        return
    if approval.reason == Approval.Reason.BUDGET_EXHAUSTED and decision == Decision.APPROVE:
        _mark(approval, Approval.Status.APPROVED, user, comment)
        audit.record(
            AuditAction.APPROVAL_APPROVED,
            run=run,
            step_index=approval.step_index,
            by=actor,
            payload={**payload, "effect": "another budget"},
        )
        return  # transitions.resume_after_review resumes it; the engine counts the allowance
    if decision == Decision.EDIT and output is None:
        raise DecisionError("edit needs the answer to return", field="output")
    proposed = approval.proposed_output if decision == Decision.APPROVE else output
    final = validate_output(run, proposed)
    digest = output_digest(final)
    _mark(
        approval,
        Approval.Status.APPROVED,
        user,
        comment,
        approved_output=final,
        approved_digest=digest,
    )
    audit.record(
        AuditAction.APPROVAL_APPROVED,
        run=run,
        step_index=approval.step_index,
        by=actor,
        payload={**payload, "edited": decision == Decision.EDIT, "digest": digest},
    )
    transitions.finish_run(run, Run.Status.SUCCEEDED, result=final, by=actor)


# --- Overdue ---------------------------------------------------------------------------------


def expire_overdue(*, limit: int = 200) -> int:
    """Apply each agent's policy to approvals past their due time: ``on_expiry`` ``reject``
    (the default: the escalation is rejected as expired) or ``escalate`` (priority up one, due
    again after another SLA). Audited as the system. Safe to run concurrently."""
    now = timezone.now()
    overdue = list(
        Approval.objects.filter(status=Approval.Status.PENDING, due_at__lt=now)
        .order_by("due_at")
        .values_list("pk", flat=True)[:limit]
    )
    handled = 0
    for approval_id in overdue:
        with transaction.atomic():
            run_id = Approval.objects.values_list("run_id", flat=True).get(pk=approval_id)
            run = transitions.lock_run(run_id, related=("agent_version", "agent"))
            assert run is not None
            approval = Approval.objects.select_for_update().get(pk=approval_id)
            if approval.status != Approval.Status.PENDING or not approval.is_overdue:
                continue
            actor = audit.Actor.system("review-sla")
            if run.agent_version.policy.get("on_expiry") == "escalate":
                priority = min(approval.priority + 1, Approval.Priority.URGENT)
                due = now + sla(run)
                Approval.objects.filter(pk=approval.pk).update(priority=priority, due_at=due)
                audit.record(
                    AuditAction.APPROVAL_ESCALATED,
                    run=run,
                    step_index=approval.step_index,
                    by=actor,
                    payload={
                        "approval": str(approval.pk),
                        "priority": Approval.Priority(priority).label,
                        "due_at": due.isoformat(),
                    },
                )
                handled += 1
                continue
        try:
            decide(
                approval_id,
                decision=Decision.REJECT,
                user=None,
                comment="expired: no decision before the due time",
                system="review-sla",
                expired=True,
            )
        except DecisionError:
            continue
        handled += 1
    return handled
