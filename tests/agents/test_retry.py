"""Dead letters: a failed run is retried from the step that failed, by an operator, audited."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.messages import get_messages

from agents import engine
from agents.engine import execute_tool_call
from agents.exceptions import RunNotRetryable
from agents.models import Run, Step
from agents.services import retry_run, submit_run
from audittrail.models import AuditEvent
from tests.support.engine import drive

CALL = [{"name": "calculator", "arguments": {"expression": "6*7"}}]


@pytest.fixture
def fake_agent(settings, fake_openai, make_agent):
    """An agent on the fake model server: one tool turn, then an answer."""
    model = f"retry-{uuid.uuid4().hex[:8]}"
    settings.AGENTSITE_PROVIDERS = {
        "fake": {"base_url": fake_openai.base_url, "api_key": "sk-test-retry-key"}
    }
    fake_openai.configure(model=model, tool_calls=[CALL])
    return model, make_agent(model_route=f"fake:{model}", tools=["calculator"])


def fail_on_the_second_turn(fake_openai, model, agent) -> Run:
    run = submit_run(agent=agent, input="what is 6*7?")
    engine.advance(run.pk)  # turn 1 asks for the calculator
    execute_tool_call(run_id=run.pk, step_index=1)
    fake_openai.configure(model=model, tool_calls=[CALL], error_rate=1.0, error_status=400)
    engine.advance(run.pk)  # turn 2: the provider refuses, permanently
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "HTTP 400" in run.error
    return run


def test_a_failed_run_is_retried_from_its_failed_step(fake_openai, fake_agent, admin_user):
    model, agent = fake_agent
    run = fail_on_the_second_turn(fake_openai, model, agent)
    done_before = list(Step.objects.filter(run=run, index__lt=2).values_list("pk", "status"))

    fake_openai.configure(model=model, tool_calls=[CALL], error_rate=0.0)  # the provider is back
    retried = retry_run(run_id=run.pk, user=admin_user)
    assert retried.status == Run.Status.RUNNING and retried.error == ""
    step = Step.objects.get(run=run, index=2)
    assert (step.status, step.attempts, step.error) == (Step.Status.PENDING, 0, "")

    finished = drive(run.pk)
    assert finished.status == Run.Status.SUCCEEDED, finished.error
    # Nothing before the failed step ran again: same rows, the tool called once.
    assert list(Step.objects.filter(run=run, index__lt=2).values_list("pk", "status")) == (
        done_before
    )
    assert Step.objects.filter(run=run).count() == 3
    assert fake_openai.count(model) == 3  # turn 1, the failed turn 2, its retry
    event = AuditEvent.objects.get(run=run, action="run.retried")
    assert (event.actor_type, event.actor, event.payload["step_index"]) == ("user", "admin", 2)
    assert event.payload["error_code"] == "provider_error"
    assert "HTTP 400" in event.payload["error"]


def test_runs_that_would_fail_the_same_way_are_not_retried(make_agent):
    ok = drive(submit_run(agent=make_agent(script=[{"text": "fine"}]), input="x").pk)
    with pytest.raises(RunNotRetryable, match="only failed runs"):
        retry_run(run_id=ok.pk)

    looping = make_agent(tools=["calculator"], script=[{"tool_calls": CALL}] * 10, max_steps=3)
    over_budget = drive(submit_run(agent=looping, input="x").pk)
    assert over_budget.error_code == "budget_exceeded"
    with pytest.raises(RunNotRetryable, match="not on a step"):
        retry_run(run_id=over_budget.pk)
    over_budget.refresh_from_db()
    assert over_budget.status == Run.Status.FAILED
    assert not AuditEvent.objects.filter(action="run.retried").exists()


def test_the_admin_retries_failed_runs_and_says_why_others_were_not(
    admin_client, fake_openai, fake_agent
):
    model, agent = fake_agent
    failed = fail_on_the_second_turn(fake_openai, model, agent)
    fake_openai.configure(model=model, tool_calls=[CALL], error_rate=0.0)
    fine = drive(submit_run(agent=agent, input="again").pk)
    assert fine.status == Run.Status.SUCCEEDED

    response = admin_client.post(
        "/admin/agents/run/",
        {"action": "retry_runs", "_selected_action": [str(failed.pk), str(fine.pk)]},
    )
    assert response.status_code == 302
    said = [str(m) for m in get_messages(response.wsgi_request)]
    assert said[0] == "Retried 1 runs from their failed step."
    assert "only failed runs are retried" in said[1]
    assert drive(failed.pk).status == Run.Status.SUCCEEDED
    # Dead letters are found by their error: the run list filters by error code.
    page = admin_client.get("/admin/agents/run/", {"error_code": "provider_error"})
    assert page.status_code == 200 and str(failed.pk) not in page.content.decode()


def test_a_session_run_is_not_retried_once_a_later_run_has_started(make_agent):
    from agents.services import start_session

    agent = make_agent(script=[{"text": "{input}", "fail": "permanent", "fail_attempts": 1}])
    session = start_session(agent=agent)
    first = submit_run(agent=agent, input="one", session=session)
    second = submit_run(agent=agent, input="two", session=session)
    assert drive(first.pk).status == Run.Status.FAILED
    engine.advance(second.pk)  # the session moves on to its next run
    assert Run.objects.get(pk=second.pk).status != Run.Status.QUEUED

    with pytest.raises(RunNotRetryable, match="later run of its session"):
        retry_run(run_id=first.pk)
    assert Run.objects.get(pk=first.pk).status == Run.Status.FAILED
