"""End to end on a real Celery worker process, Redis, Postgres and the fake model server (HTTP)."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from agents.models import Run, Step
from agents.services import submit_run
from agentsite.celery import app
from audittrail.models import AuditEvent
from harness.polling import poll

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def wait_final(run_id, timeout: float = 60.0) -> Run:
    return poll(
        lambda: (run := Run.objects.get(pk=run_id)).is_final and run,
        timeout=timeout,
        what=f"run {run_id} to finish",
    )


def unique_model(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_demo_agent_runs_succeed_on_a_real_worker(celery_worker):
    call_command("seed_demo", stdout=io.StringIO())
    runs = [submit_run(agent="support-assistant", input=f"refund question {i}") for i in range(8)]

    finished = [wait_final(run.pk) for run in runs]

    assert {run.status for run in finished} == {Run.Status.SUCCEEDED}, [
        (run.status, run.error) for run in finished
    ]
    for run in finished:
        assert list(run.steps.order_by("index").values_list("kind", "status")) == [
            ("model", "succeeded"),
            ("tool", "succeeded"),
            ("model", "succeeded"),
        ]
        assert "Refund policy" in run.result


def test_run_agent_wait_follows_a_run_to_its_result(celery_worker):
    call_command("seed_demo", stdout=io.StringIO())
    out = io.StringIO()
    call_command("run_agent", "math-tutor", "(17 + 25) * 3 / 7", wait=True, timeout=60, stdout=out)
    text = out.getvalue()
    assert "step 1 tool calculator" in text
    assert '"result": 18' in text and "run succeeded" in text


def test_openai_provider_over_http_with_parallel_tool_calls_and_retries(
    celery_worker, fake_openai, make_agent
):
    model = unique_model("parallel")
    fake_openai.configure(
        model=model,
        fail_first=2,
        tool_calls=[
            [
                {"name": "calculator", "arguments": {"expression": "2+3"}},
                {"name": "calculator", "arguments": {"expression": "10/4"}},
            ]
        ],
        final="Answer: {tool_results}",
    )
    agent = make_agent(model_route=f"fake:{model}", tools=["calculator"])

    run = wait_final(submit_run(agent=agent, input="add things").pk)

    assert run.status == Run.Status.SUCCEEDED, run.error
    steps = list(run.steps.order_by("index"))
    assert [(s.kind, s.status, s.attempts) for s in steps] == [
        ("model", "succeeded", 3),
        ("tool", "succeeded", 1),
        ("tool", "succeeded", 1),
        ("model", "succeeded", 1),
    ]
    assert {s.parent_index for s in steps[1:3]} == {0}
    assert run.result == (
        'Answer: {"expression": "2+3", "result": 5}; {"expression": "10/4", "result": 2.5}'
    )
    assert fake_openai.count(model) == 4  # two 500s, then one call per turn
    bodies = [body for name, body in fake_openai.requests if name == model]
    schema = bodies[-1]["tools"][0]["function"]
    assert schema["name"] == "calculator" and "expression" in schema["parameters"]["properties"]
    tool_messages = [m for m in bodies[-1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_0_0", "call_0_1"]
    assert AuditEvent.objects.filter(run=run, action="step.retry_scheduled").count() == 2


def test_a_server_answering_nonsense_fails_the_run_with_a_clear_error(
    celery_worker, fake_openai, make_agent
):
    model = unique_model("nonsense")
    fake_openai.configure(model=model, nonsense="html")
    agent = make_agent(model_route=f"fake:{model}")

    run = wait_final(submit_run(agent=agent, input="hello").pk)

    assert run.status == Run.Status.FAILED
    assert run.error_code == "provider_invalid_response"
    assert "answered with something that is not JSON" in run.error
    assert fake_openai.count(model) == 1  # nonsense is not retried


def test_a_duplicate_nudge_during_a_model_call_does_not_repeat_the_call(
    celery_worker, fake_openai, make_agent
):
    model = unique_model("slow")
    fake_openai.configure(model=model, latency_ms=1500)
    agent = make_agent(model_route=f"fake:{model}")
    run = submit_run(agent=agent, input="hello")
    poll(
        lambda: Step.objects.filter(run_id=run.pk, status=Step.Status.RUNNING).exists(),
        what="the model step to start",
    )
    for _ in range(3):  # as if the broker redelivered the message three times
        app.send_task("agents.advance_run", args=[str(run.pk)])

    run = wait_final(run.pk)
    assert run.status == Run.Status.SUCCEEDED
    assert fake_openai.count(model) == 1
    assert run.steps.get().attempts == 1


def test_a_redelivered_task_for_a_step_already_done_does_not_repeat_it(
    celery_worker, fake_openai, make_agent
):
    model = unique_model("redeliver")
    fake_openai.configure(
        model=model, tool_calls=[[{"name": "calculator", "arguments": {"expression": "1+1"}}]]
    )
    agent = make_agent(model_route=f"fake:{model}", tools=["calculator"])
    run = wait_final(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.SUCCEEDED
    calls, steps = fake_openai.count(model), list(run.steps.values_list("id", "status", "attempts"))
    events = AuditEvent.objects.filter(run=run).count()
    before = celery_worker.task_totals()

    app.send_task("agents.advance_run", args=[str(run.pk)])
    app.send_task("tools.execute_tool_call", args=[str(run.pk), 1])
    poll(
        lambda: (
            (after := celery_worker.task_totals()).get("agents.advance_run", 0)
            > before.get("agents.advance_run", 0)
            and after.get("tools.execute_tool_call", 0) > before.get("tools.execute_tool_call", 0)
        ),
        what="the worker to process the redelivered tasks",
    )

    assert fake_openai.count(model) == calls
    assert list(run.steps.values_list("id", "status", "attempts")) == steps
    assert AuditEvent.objects.filter(run=run).count() == events


def test_the_reconciler_resumes_a_run_whose_message_was_lost(celery_worker, make_agent):
    agent = make_agent(script=[{"text": "recovered: {input}"}])
    stale = timezone.now() - timedelta(minutes=10)
    # A queued run whose nudge never reached the broker.
    run = Run.objects.create(
        agent=agent,
        agent_version=agent.current_version,
        model_route="scripted:demo",
        input="lost",
    )
    Run.objects.filter(pk=run.pk).update(updated_at=stale)

    app.send_task("agents.reconcile_runs")

    run = wait_final(run.pk)
    assert run.status == Run.Status.SUCCEEDED and run.result == "recovered: lost"
    assert AuditEvent.objects.filter(run=run, action="run.nudged", actor="reconciler").exists()
