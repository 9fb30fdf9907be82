"""The database statements each engine step costs, pinned so a regression fails here.

A step's work is a few short transactions; every statement is a round trip to Postgres on the
hot path of every run. If a change adds one on purpose, update the figure and say why in the
commit; if it removes one, lower it.
"""

from __future__ import annotations

from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents import engine
from agents.engine import execute_tool_call
from agents.models import Run
from agents.providers import prices
from agents.services import submit_run

SCRIPT = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]},
    {"text": "{tool_results}"},
]


def statements(capture: CaptureQueriesContext) -> list[str]:
    """The statements sent, without the savepoints the test's own transaction adds (in a worker
    those are BEGIN/COMMIT of the step's transactions)."""
    return [
        q["sql"]
        for q in capture.captured_queries
        if not q["sql"].startswith(("SAVEPOINT", "RELEASE SAVEPOINT"))
    ]


def test_statements_per_engine_step(make_agent):
    agent = make_agent(tools=["calculator"], script=SCRIPT)
    run = submit_run(agent=agent, input="x")
    # A worker's steady state: the model prices are cached (10 s), as they were whenever an
    # earlier test of the session had read them lately (the figure depended on test order).
    prices.forget_prices()
    prices.price_of(run.model_route)

    with CaptureQueriesContext(connection) as model_turn:
        engine.advance(run.pk)  # start the run, the model call, one tool call recorded
    with CaptureQueriesContext(connection) as tool_call:
        execute_tool_call(run_id=run.pk, step_index=1)
    with CaptureQueriesContext(connection) as final_turn:
        engine.advance(run.pk)  # the model's answer and the end of the run

    assert Run.objects.get(pk=run.pk).status == Run.Status.SUCCEEDED
    counts = {
        "model turn with a tool call": len(statements(model_turn)),
        "tool call": len(statements(tool_call)),
        "final model turn": len(statements(final_turn)),
    }
    assert counts == {
        "model turn with a tool call": 12,
        "tool call": 6,
        "final model turn": 9,
    }, "\n\n".join(statements(model_turn) + statements(tool_call) + statements(final_turn))


def test_a_step_marks_progress_only_on_a_run_not_touched_lately(make_agent, settings):
    """The reconciler nudges runs whose updated_at is old: a step must refresh a stale one, and
    may skip the statement on a fresh one."""
    from datetime import timedelta

    from django.utils import timezone

    settings.AGENTSITE_STALLED_AFTER = 60
    agent = make_agent(tools=["calculator"], script=SCRIPT)
    run = submit_run(agent=agent, input="x")
    engine.advance(run.pk)
    stale = timezone.now() - timedelta(seconds=20)  # older than a quarter of 60 s
    Run.objects.filter(pk=run.pk).update(updated_at=stale)

    execute_tool_call(run_id=run.pk, step_index=1)
    touched = Run.objects.get(pk=run.pk).updated_at
    assert touched > stale + timedelta(seconds=19)

    fresh = timezone.now() - timedelta(seconds=5)
    Run.objects.filter(pk=run.pk).update(updated_at=fresh)
    with CaptureQueriesContext(connection) as final_turn:
        engine.advance(run.pk)
    assert Run.objects.get(pk=run.pk).status == Run.Status.SUCCEEDED
    assert not any(
        q["sql"].startswith('UPDATE "agents_run" SET "updated_at"')
        for q in final_turn.captured_queries
    )
