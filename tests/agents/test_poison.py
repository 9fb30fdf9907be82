"""Poison messages: a step task that fails for good ends its run ``failed`` with the reason,
instead of leaving it active for the reconciler to nudge into the same failure forever."""

from __future__ import annotations

import pytest
from django.db import OperationalError

from agents import engine, reconciler
from agents.engine import model_step, tool_step
from agents.models import Run, Step
from agents.services import submit_run
from agents.tasks import advance_run, execute_tool_call
from audittrail.models import AuditEvent

CALL = [{"name": "calculator", "arguments": {"expression": "6*7"}}]


def crash(*args: object, **kwargs: object) -> None:
    raise RuntimeError("a bug in the engine")


def test_a_model_step_task_that_crashes_fails_its_run_with_the_reason(
    make_agent, monkeypatch, settings
):
    run = submit_run(agent=make_agent(), input="hello")
    monkeypatch.setattr(model_step, "build_messages", crash)  # a bug in planning, before any call

    result = advance_run.apply(args=[str(run.pk)])

    assert result.failed()
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error_code == "internal_error"
    assert run.error == "agents.advance_run failed: RuntimeError: a bug in the engine"
    event = AuditEvent.objects.get(run=run, action="run.failed")
    assert (event.actor_type, event.actor) == ("system", "worker")
    assert event.payload["error"] == run.error
    # The step the crashed task was creating was rolled back with it; nothing is left open,
    # so the reconciler has nothing to nudge.
    assert not Step.objects.filter(run=run, status__in=("pending", "running")).exists()
    settings.AGENTSITE_STALLED_AFTER = 0
    assert reconciler.reconcile_stalled_runs() == 0


def test_a_tool_step_task_that_crashes_fails_its_run_and_cancels_the_call(make_agent, monkeypatch):
    agent = make_agent(script=[{"tool_calls": CALL}, {"text": "42"}], tools=["calculator"])
    run = submit_run(agent=agent, input="what is 6*7?")
    engine.advance(run.pk)  # turn 1 asks for the calculator
    monkeypatch.setattr(tool_step.policy, "authorize", crash)

    result = execute_tool_call.apply(args=[str(run.pk), 1])

    assert result.failed()
    run.refresh_from_db()
    assert (run.status, run.error_code) == (Run.Status.FAILED, "internal_error")
    assert run.error.startswith("tools.execute_tool_call failed: RuntimeError")
    assert Step.objects.get(run=run, index=1).status == Step.Status.CANCELLED


@pytest.mark.parametrize(
    "exc", [OperationalError("server closed the connection"), ConnectionError("redis down")]
)
def test_a_task_that_fails_on_infrastructure_leaves_the_run_to_the_reconciler(make_agent, exc):
    """A database, broker or Redis outage is not the message's fault: the run's state is
    intact and it resumes once the service is back."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    if isinstance(exc, ConnectionError):
        exc = RedisConnectionError(str(exc))
    run = submit_run(agent=make_agent(), input="hello")

    advance_run.on_failure(exc, "task-id", [str(run.pk)], {}, None)

    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED
    assert not AuditEvent.objects.filter(run=run, action="run.failed").exists()


def test_a_crash_reported_for_a_finished_run_changes_nothing(make_agent):
    run = submit_run(agent=make_agent(script=[{"text": "done"}]), input="hello")
    engine.advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED

    advance_run.on_failure(RuntimeError("late"), "task-id", [str(run.pk)], {}, None)

    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert not AuditEvent.objects.filter(run=run, action="run.failed").exists()
