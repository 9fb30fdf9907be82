"""The worker pool production runs (gevent, README: Performance), on a real worker process: one
process holds many model calls in flight because no database connection is pinned while a call
waits, and a tool's time limit still ends a call that overruns it."""

from __future__ import annotations

import time
import uuid

import pytest

from agents.models import Run, Step
from agents.services import submit_run
from harness.polling import poll

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_one_worker_process_holds_more_model_calls_in_flight_than_it_has_connections(
    celery_worker, fake_openai, make_agent
):
    if celery_worker.pool != "gevent":
        pytest.skip("the prefork pool runs one task per child process")
    model = f"in-flight-{uuid.uuid4().hex[:8]}"
    fake_openai.configure(model=model, latency_ms=1500)
    agent = make_agent(model_route=f"fake:{model}")
    started = time.monotonic()
    run_ids = [submit_run(agent=agent, input=f"question {i}").pk for i in range(60)]

    def all_final() -> bool:
        return (
            not Run.objects.filter(pk__in=run_ids).exclude(status__in=Run.FINAL_STATUSES).exists()
        )

    poll(all_final, timeout=60, interval=0.2, what="60 runs to finish")
    elapsed = time.monotonic() - started

    statuses = set(Run.objects.filter(pk__in=run_ids).values_list("status", flat=True))
    assert statuses == {Run.Status.SUCCEEDED}
    # The worker's connection pool holds AGENTSITE_DB_POOL_MAX (set to 5 for the test worker)
    # connections: a step that kept its connection through the model call could not have more
    # than 5 calls waiting at once.
    peak = fake_openai.peak_in_flight(model)
    assert peak > 5 * 4, f"only {peak} model calls were in flight at once"
    # 60 calls of 1.5 s one after another would take 90 s; 5 at a time, 18 s.
    assert elapsed < 15, f"60 runs took {elapsed:.1f} s"


def test_a_tool_call_over_its_time_limit_fails_and_the_run_goes_on(celery_worker, make_agent):
    agent = make_agent(
        grants=["dawdle"],
        script=[
            {"tool_calls": [{"name": "dawdle", "arguments": {"seconds": 20}}]},
            {"text": "the tool said: {last_tool_result}"},
        ],
    )
    run_id = submit_run(agent=agent, input="wait").pk
    run = poll(
        lambda: (r := Run.objects.get(pk=run_id)).is_final and r,
        timeout=30,
        what="the run to finish",
    )
    step = Step.objects.get(run=run, kind=Step.Kind.TOOL)
    assert step.status == Step.Status.FAILED
    assert "timed out after 1s" in step.error
    assert run.status == Run.Status.SUCCEEDED
    assert "timed out after 1s" in run.result
    # Ended by the 1 s limit, not by the 20 s sleep or the hard limit.
    assert step.latency_ms is not None and step.latency_ms < 5000
