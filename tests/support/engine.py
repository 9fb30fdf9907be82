"""Advancing a run in this process, as the workers would, step by step."""

from __future__ import annotations

from typing import Any

from agents import engine
from agents.engine import execute_tool_call
from agents.models import Run, Step


def drive(run_id: Any, *, max_iterations: int = 100) -> Run:
    """Advance a run in this process, as workers would, until it is final or waits for something.

    Performs tool calls in index order; a retry outcome is followed at once (no backoff wait).
    """
    for _ in range(max_iterations):
        run = Run.objects.get(pk=run_id)
        if run.is_final:
            return run
        # Time passes: a step backing off after a transient failure may be taken now.
        Step.objects.filter(run=run, status=Step.Status.PENDING).update(not_before=None)
        tools = list(
            Step.objects.filter(run=run, kind=Step.Kind.TOOL, status=Step.Status.PENDING)
            .order_by("index")
            .values_list("index", flat=True)
        )
        if tools:
            for index in tools:
                execute_tool_call(run_id=run.pk, step_index=index)
        elif run.status == Run.Status.WAITING_APPROVAL:
            return run  # a reviewer decides next
        else:
            engine.advance(run.pk)
    raise AssertionError(f"run {run_id} did not finish in {max_iterations} iterations")
