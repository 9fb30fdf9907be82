"""The model's answer (a turn without tool calls): checked against the agent's output schema
(one repair turn, then a reviewer) and its confidence threshold (a reviewer), then the run's
result."""

from __future__ import annotations

import math
from typing import Any

from agents.dispatch import advance_run_on_commit
from agents.jsonsafe import json_safe
from agents.models import Run, Step
from agents.outputs import OutputInvalid, check_output, loads_strict
from approvals.models import Approval
from audittrail import writer as audit
from audittrail.actions import AuditAction

from . import transitions


def _confidence(output: Any, text: str) -> float | None:
    value = output
    if not isinstance(value, dict):
        try:
            value = loads_strict(text)
        except ValueError:
            return None
    confidence = value.get("confidence") if isinstance(value, dict) else None
    if not isinstance(confidence, int | float) or isinstance(confidence, bool):
        return None
    # NaN compares false with everything: only a real 0..1 figure can pass the threshold.
    return float(confidence) if math.isfinite(confidence) and 0 <= confidence <= 1 else None


def conclude(run: Run, step: Step, text: str) -> None:
    """The model answered without tool calls: check the answer against the agent's output
    schema (one repair turn, then a reviewer) and its confidence threshold (a reviewer), and
    finish the run with it."""
    version = run.agent_version
    policy = version.policy
    try:
        output = check_output(version.output_schema, text)
    except OutputInvalid as exc:
        earlier = (
            Step.objects.filter(run=run, kind=Step.Kind.MODEL, index__lt=step.index)
            .order_by("-index")
            .values_list("response", flat=True)
            .first()
        )
        if not (earlier or {}).get("output_errors"):
            # One repair turn: the model reads what was wrong and answers again.
            Step.objects.filter(pk=step.pk).update(
                response={**(step.response or {}), "output_errors": json_safe(str(exc))}
            )
            audit.record(
                AuditAction.OUTPUT_INVALID,
                run=run,
                step_index=step.index,
                payload={"errors": json_safe(str(exc)), "repair": True},
            )
            advance_run_on_commit(run.pk)
            return
        transitions.hold_for_review(
            run,
            step_index=step.index,
            reason=Approval.Reason.OUTPUT_INVALID,
            detail=f"the answer fails the output schema after one repair attempt: {exc}",
            output=json_safe(text),
        )
        return
    threshold = policy.get("min_confidence")
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        if not version.output_schema and isinstance(output, str):
            try:
                parsed = loads_strict(output)
            except ValueError:
                parsed = None
            output = parsed if isinstance(parsed, dict) else output
        confidence = _confidence(output, text)
        if confidence is None or confidence < threshold:
            transitions.hold_for_review(
                run,
                step_index=step.index,
                reason=Approval.Reason.LOW_CONFIDENCE,
                detail=(
                    "the model gave no confidence"
                    if confidence is None
                    else f"the model's confidence {confidence} is below the agent's "
                    f"threshold {threshold}"
                ),
                output=json_safe(output),
            )
            return
    # The model's answer ends its turn, and a turn is asked for only when every earlier step
    # has finished: nothing is left to cancel.
    transitions.finish_run(run, Run.Status.SUCCEEDED, result=json_safe(output), open_steps=False)
