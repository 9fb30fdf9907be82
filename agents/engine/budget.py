"""A run's budget as the engine spends it: how many budgets it has (one, plus one per budget
escalation a reviewer approved), and what happens when it runs out (the run fails, or a
reviewer is asked for another)."""

from __future__ import annotations

from agents import budgets
from agents.errorcodes import RunErrorCode
from agents.models import Run, Step
from approvals import escalation
from approvals.models import Approval

from . import transitions


def allowance(run: Run) -> int:
    """Budgets the run has: 1, plus one per budget escalation a reviewer approved."""
    if run.agent_version.policy.get("on_budget_exhausted") != "escalate":
        return 1
    return escalation.budget_allowance(run)


def step_limit(run: Run) -> int:
    return budgets.Budget.of(run, allowance(run)).max_steps


def exhausted(run: Run, last: Step | None, message: str) -> None:
    """Fail the run, or, if the agent's policy says ``on_budget_exhausted: escalate``, ask a
    reviewer for another budget."""
    if run.agent_version.policy.get("on_budget_exhausted") != "escalate":
        transitions.fail(run, RunErrorCode.BUDGET_EXCEEDED, message)
        return
    index = last.index if last is not None else 0
    if Approval.objects.filter(run=run, step_index=index, reason="budget_exhausted").exists():
        transitions.fail(
            run, RunErrorCode.BUDGET_EXCEEDED, message
        )  # already extended at this very step
        return
    transitions.hold_for_review(
        run, step_index=index, reason=Approval.Reason.BUDGET_EXHAUSTED, detail=message
    )
