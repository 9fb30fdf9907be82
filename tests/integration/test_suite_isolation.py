"""The suite's workers are quiet when a test's database is flushed (tests/conftest.py,
_worker_quiet_around_flushes): a flush is a TRUNCATE of every table, which deadlocked with the
session's worker writing a step of the test that had just ended ("deadlock detected ...
couldn't be flushed"). Before each flush a worker is drained: it finishes what it executes, and
what it held of the ended test (reserved messages, countdowns) never runs."""

from __future__ import annotations

import uuid

import pytest

from agents.models import Run, Step
from agents.services import submit_run
from agentsite.celery import app
from harness.polling import poll
from tests.support.processes import WorkerProcess, purge_queues

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_drain_waits_for_the_task_in_flight_and_what_the_worker_held_never_runs(
    celery_worker: WorkerProcess, make_agent
):
    agent = make_agent(
        model_route="scripted:dawdle",
        script=[
            {"tool_calls": [{"name": "dawdle", "arguments": {"seconds": 0.8}}]},
            {"text": "done"},
        ],
        tools=["dawdle"],
    )
    run = submit_run(agent=agent, input="take your time")
    poll(
        lambda: Step.objects.filter(run=run, kind="tool", status=Step.Status.RUNNING).exists(),
        timeout=30,
        what="the tool call to start",
    )
    # A countdown the worker holds in its timer, as a step's retry would be.
    later = str(uuid.uuid4())
    app.send_task("agents.advance_run", args=[str(run.pk)], task_id=later, countdown=1.5)
    poll(
        lambda: f"{later}] received" in celery_worker.log.read_text(),
        timeout=15,
        what="the worker to hold the countdown",
    )

    celery_worker.drain()
    purge_queues()
    celery_worker.drain()

    # Nothing of the run executes any more: what was running finished and was recorded (the
    # turn it led to may have run too, before the drain saw the worker idle), not cut off.
    step = Step.objects.get(run=run, kind="tool")
    assert step.status == Step.Status.SUCCEEDED, (step.status, step.error)
    assert not Step.objects.filter(run=run, status=Step.Status.RUNNING).exists()
    # The countdown it held is discarded when due.
    poll(
        lambda: (
            f"Discarding revoked task: agents.advance_run[{later}]" in celery_worker.log.read_text()
        ),
        timeout=15,
        what="the countdown to be discarded",
    )
    assert f"{later}] succeeded" not in celery_worker.log.read_text()

    # The worker goes on consuming: the next test's runs run as usual.
    again = submit_run(agent=agent, input="once more")
    finished = poll(
        lambda: (r := Run.objects.get(pk=again.pk)).is_final and r, timeout=30, what="a run"
    )
    assert finished.status == Run.Status.SUCCEEDED and finished.result == "done"
