"""The tool calls of a model turn: a step each, decided by tools.policy (refused, failed at
once on an open circuit, held for a reviewer, or sent to run in parallel)."""

from __future__ import annotations

from typing import Any

from agents.dispatch import advance_run_on_commit, tool_call_on_commit
from agents.models import Run, Step
from agents.providers import ModelResponse, ToolCallRequest
from approvals import escalation
from approvals.models import Approval
from audittrail import writer as audit
from audittrail.actions import AuditAction
from tools import policy

from . import budget, transitions
from .requests import ToolStepRequest
from .steps import now

# The built-in tool a model calls to ask a human; it is always held for a reviewer.
ESCALATE_TOOL = "escalate_to_human"


def record_tool_calls(run: Run, model_step: Step, response: ModelResponse) -> None:
    """Create a step per tool call and decide each one (tools.policy): a call the agent may not
    make, or whose arguments fail validation or the grant's constraints, is refused without
    executing; a call to a tool whose circuit is open fails at once; a call whose grant requires
    approval waits for a reviewer; the rest are enqueued to run in parallel."""
    limit = budget.step_limit(run)
    if model_step.index + len(response.tool_calls) >= limit:
        budget.exhausted(
            run,
            model_step,
            f"the model asked for {len(response.tool_calls)} tool calls, which would pass the "
            f"run's limit of {limit} steps",
        )
        return
    live = policy.live_grants(run.agent_id)
    fates = [
        _decide(run, model_step, model_step.index + offset, call, live)
        for offset, call in enumerate(response.tool_calls, start=1)
    ]
    held, dispatched = fates.count("held"), fates.count("dispatched")
    if held:
        transitions.wait_for_review(run, payload={"approvals": held})
    elif not dispatched:
        advance_run_on_commit(run.pk)  # let the model read the refusals and failures


def _decide(run: Run, model_step: Step, index: int, call: ToolCallRequest, live: Any) -> str:
    """One call's step, decided: "refused", "failed" (its circuit is open), "held" for a
    reviewer, or "dispatched" to a worker."""
    verdict = policy.authorize(
        run,
        call.name,
        call.arguments,
        arguments_error=call.arguments_error,
        live=live,
        step_index=index,
    )
    held = verdict.mode == "require_approval" or call.name == ESCALATE_TOOL
    if verdict.refusal:
        status = Step.Status.REFUSED
    elif verdict.unavailable:
        status = Step.Status.FAILED
    else:
        status = Step.Status.AWAITING_APPROVAL if held else Step.Status.PENDING
    step = Step.objects.create(
        run=run,
        index=index,
        kind=Step.Kind.TOOL,
        parent_index=model_step.index,
        status=status,
        tool_name=call.name[:100],
        tool_call_id=call.id[:200],
        request=ToolStepRequest(arguments=call.arguments).to_json(),
        error=verdict.refusal or verdict.unavailable,
        finished_at=now() if not verdict.allowed else None,
    )
    if verdict.refusal or verdict.unavailable:
        audit.record(
            AuditAction.TOOL_CALL_REFUSED
            if verdict.refusal
            else AuditAction.TOOL_CALL_SHORT_CIRCUITED,
            run=run,
            step_index=index,
            payload={"tool": call.name, "reason": verdict.refusal or verdict.unavailable},
        )
        return "refused" if verdict.refusal else "failed"
    assert verdict.spec is not None
    audit.record(
        AuditAction.TOOL_CALL_REQUESTED,
        run=run,
        step_index=index,
        by=audit.Actor.agent(model_step.model_route or run.model_route),
        payload={"tool": call.name, "call_id": call.id, "mode": verdict.mode},
    )
    if held and call.name == ESCALATE_TOOL:
        arguments = call.arguments if isinstance(call.arguments, dict) else {}
        escalation.request_tool_approval(
            run,
            step,
            reason=Approval.Reason.MODEL_REQUESTED,
            detail=str(arguments.get("reason") or "the model asked for a human"),
        )
        return "held"
    if held:
        escalation.request_tool_approval(run, step, detail=verdict.approval_reason)
        return "held"
    tool_call_on_commit(run.pk, index, timeout=verdict.spec.timeout)
    return "dispatched"
