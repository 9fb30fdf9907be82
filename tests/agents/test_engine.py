"""The run engine, driven in-process against the real test database (no broker involved)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from agents import engine
from agents.exceptions import AgentNotFound, AgentUnavailable, InvalidRunInput, RunAlreadyFinished
from agents.models import Run, Step
from agents.services import cancel_run, save_agent, start_session, submit_run
from audittrail.models import AuditEvent
from tests.support.engine import drive

pytestmark = pytest.mark.django_db

SEARCH_THEN_ANSWER = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "Result: {last_tool_result}"},
]


def actions(run: Run) -> list[str]:
    return list(AuditEvent.objects.filter(run=run).values_list("action", flat=True))


def test_scripted_run_goes_model_tool_model_and_succeeds(make_agent):
    agent = make_agent(tools=["calculator"], script=SEARCH_THEN_ANSWER)
    run = drive(submit_run(agent=agent, input="6*7").pk)

    assert run.status == Run.Status.SUCCEEDED
    assert run.result == 'Result: {"expression": "6*7", "result": 42}'
    steps = list(run.steps.order_by("index"))
    assert [(s.kind, s.status) for s in steps] == [
        ("model", "succeeded"),
        ("tool", "succeeded"),
        ("model", "succeeded"),
    ]
    assert steps[1].parent_index == 0 and steps[1].response["result"] == 42
    assert run.input_tokens == sum(s.input_tokens for s in steps) > 0
    assert run.started_at and run.finished_at and run.finished_at >= run.started_at
    assert actions(run) == [
        "run.submitted",
        "run.started",
        "step.succeeded",
        "tool_call.requested",
        "tool_call.succeeded",
        "step.succeeded",
        "run.succeeded",
    ]
    assert set(AuditEvent.objects.filter(run=run).values_list("trace_id", flat=True)) == {
        run.trace_id
    }


def test_advancing_a_finished_run_again_changes_nothing(make_agent):
    agent = make_agent(tools=["calculator"], script=SEARCH_THEN_ANSWER)
    run = drive(submit_run(agent=agent, input="1+1").pk)
    before = (Step.objects.filter(run=run).count(), AuditEvent.objects.filter(run=run).count())

    engine.advance(run.pk)
    from agents.engine import execute_tool_call

    execute_tool_call(run_id=run.pk, step_index=1)

    after = (Step.objects.filter(run=run).count(), AuditEvent.objects.filter(run=run).count())
    assert after == before
    assert Run.objects.get(pk=run.pk).status == Run.Status.SUCCEEDED


def test_a_step_held_by_a_live_worker_is_left_alone_and_taken_over_when_its_lease_expires(
    make_agent,
):
    agent = make_agent(script=[{"text": "done"}])
    run = submit_run(agent=agent, input="hi")
    plan = engine.plan(run.pk)  # a worker claims the model step... and dies
    assert plan is not None and plan.step.attempts == 1

    assert engine.plan(run.pk) is None  # a duplicate nudge: the lease is live
    Step.objects.filter(pk=plan.step.pk).update(lease_expires_at=timezone.now() - timedelta(1))

    run = drive(run.pk)
    step = run.steps.get()
    assert run.status == Run.Status.SUCCEEDED and step.attempts == 2
    assert "step.lease_expired" in actions(run)


def test_a_step_lost_on_every_attempt_fails_the_run(make_agent, settings):
    settings.AGENTSITE_STEP_MAX_ATTEMPTS = 2
    agent = make_agent(script=[{"text": "done"}])
    run = submit_run(agent=agent, input="hi")
    for _ in range(2):
        plan = engine.plan(run.pk)
        assert plan is not None
        Step.objects.filter(pk=plan.step.pk).update(lease_expires_at=timezone.now())
    assert engine.plan(run.pk) is None
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.error_code == "worker_lost"


def test_a_tool_the_agent_is_not_granted_is_refused_and_reported_to_the_model(make_agent):
    script = [
        {"tool_calls": [{"name": "knowledge_search", "arguments": {"query": "x"}}]},
        {"text": "The tool said: {last_tool_result}"},
    ]
    agent = make_agent(tools=["calculator"], script=script)
    run = drive(submit_run(agent=agent, input="hi").pk)

    tool_step = run.steps.get(kind=Step.Kind.TOOL)
    assert tool_step.status == Step.Status.REFUSED and tool_step.attempts == 0
    assert "not available to this agent" in tool_step.error
    assert run.status == Run.Status.SUCCEEDED
    assert run.result.startswith("The tool said: Refused: tool 'knowledge_search' is not available")
    assert "tool_call.refused" in actions(run)


def test_invalid_tool_arguments_are_refused_with_the_field_named(make_agent):
    script = [
        {"tool_calls": [{"name": "calculator", "arguments": {"expr": "1+1"}}]},
        {"text": "{last_tool_result}"},
    ]
    agent = make_agent(tools=["calculator"], script=script)
    run = drive(submit_run(agent=agent, input="hi").pk)
    step = run.steps.get(kind=Step.Kind.TOOL)
    assert step.status == Step.Status.REFUSED
    assert "invalid arguments for calculator: expression: Field required" in step.error


def test_refusals_turn_after_turn_end_the_run_instead_of_looping(make_agent, settings):
    settings.AGENTSITE_MAX_REFUSALS = 2
    agent = make_agent(tools=[], script=[{"tool_calls": [{"name": "calculator", "arguments": {}}]}])
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.FAILED and run.error_code == "too_many_refusals"
    assert run.steps.filter(kind=Step.Kind.MODEL).count() == 2


def test_parallel_tool_calls_all_finish_before_the_next_model_turn(make_agent):
    script = [
        {
            "tool_calls": [
                {"name": "calculator", "arguments": {"expression": "2+2"}},
                {"name": "calculator", "arguments": {"expression": "1/0"}},
                {"name": "calculator", "arguments": {"expression": "3*3"}},
            ]
        },
        {"text": "{tool_results}"},
    ]
    agent = make_agent(tools=["calculator"], script=script)
    run = submit_run(agent=agent, input="go")
    engine.advance(run.pk)
    from agents.engine import execute_tool_call

    execute_tool_call(run_id=run.pk, step_index=1)
    engine.advance(run.pk)  # two calls still pending: nothing to do yet
    assert run.steps.count() == 4
    run = drive(run.pk)

    assert run.status == Run.Status.SUCCEEDED
    assert [s.status for s in run.steps.filter(kind="tool").order_by("index")] == [
        "succeeded",
        "failed",
        "succeeded",
    ]
    # A partial failure is reported to the model, not fatal to the run.
    assert run.result == (
        '{"expression": "2+2", "result": 4}; Error: division by zero; '
        '{"expression": "3*3", "result": 9}'
    )


def test_transient_model_errors_are_retried_with_backoff_then_succeed(make_agent):
    agent = make_agent(script=[{"fail": "transient", "fail_attempts": 2, "text": "ok"}])
    run = submit_run(agent=agent, input="hi")
    first = engine.advance(run.pk)
    assert first.retry_in is not None and 0 < first.retry_in <= 60
    step = Step.objects.get(run=run)
    assert step.status == Step.Status.PENDING and step.error == "scripted transient failure"
    assert step.not_before > timezone.now()
    assert engine.plan(run.pk) is None  # an early nudge does not cut the backoff short

    run = drive(run.pk)
    step.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and step.attempts == 3
    assert actions(run).count("step.retry_scheduled") == 2


def test_transient_errors_give_up_after_the_attempt_limit(make_agent, settings):
    settings.AGENTSITE_STEP_MAX_ATTEMPTS = 3
    agent = make_agent(script=[{"fail": "transient", "fail_attempts": 99, "text": "never"}])
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.FAILED
    assert run.error_code == "provider_unavailable"
    assert run.error == "gave up after 3 attempts: scripted transient failure"


def test_a_permanent_model_error_fails_the_run_at_once_with_the_reason(make_agent):
    agent = make_agent(
        script=[{"fail": "permanent", "message": "model 'x' does not exist", "text": ""}]
    )
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.FAILED
    assert run.error == "model 'x' does not exist" and run.steps.get().attempts == 1


def test_an_unknown_provider_fails_the_run_with_a_clear_error(make_agent):
    agent = make_agent(script=[{"text": "x"}])
    run = drive(submit_run(agent=agent, input="hi", model_route="nowhere:model-1").pk)
    assert run.status == Run.Status.FAILED
    assert "unknown model provider 'nowhere'" in run.error
    assert "AGENTSITE_PROVIDER_NOWHERE_BASE_URL" in run.error


def test_the_step_budget_stops_the_run(make_agent):
    loop = [{"tool_calls": [{"name": "calculator", "arguments": {"expression": "1"}}]}]
    agent = make_agent(tools=["calculator"], script=loop * 10, max_steps=5)
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"
    assert run.steps.count() == 5


def test_the_token_budget_stops_the_run_before_the_call_that_would_pass_it(make_agent):
    loop = [{"tool_calls": [{"name": "calculator", "arguments": {"expression": "1"}}]}]
    agent = make_agent(tools=["calculator"], script=loop * 20, max_tokens_per_run=600)
    run = drive(submit_run(agent=agent, input="a long enough input to use tokens " * 3).pk)
    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"
    assert "tokens" in run.error and "limit is 600" in run.error
    assert run.steps.filter(kind="model").count() >= 2
    assert run.input_tokens + run.output_tokens <= 600  # stopped before, not after


def test_a_budget_too_small_for_the_first_call_makes_no_call(make_agent):
    agent = make_agent(script=[{"text": "x"}], max_tokens_per_run=10)
    run = drive(submit_run(agent=agent, input="a long enough input to use tokens " * 3).pk)
    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"
    assert "the next call needs about" in run.error
    assert run.steps.count() == 0


def test_cancel_stops_a_run_and_its_pending_steps(make_agent):
    agent = make_agent(tools=["calculator"], script=SEARCH_THEN_ANSWER)
    run = submit_run(agent=agent, input="1+1")
    engine.advance(run.pk)  # the model asked for a tool call, now pending
    cancel_run(run_id=run.pk)

    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED and run.finished_at
    assert run.steps.get(kind="tool").status == Step.Status.CANCELLED
    assert drive(run.pk).steps.count() == 2  # nothing more happens
    with pytest.raises(RunAlreadyFinished):
        cancel_run(run_id=run.pk)


def test_a_step_finishing_after_cancel_is_not_used(make_agent):
    agent = make_agent(script=[{"text": "late answer"}])
    run = submit_run(agent=agent, input="hi")
    plan = engine.plan(run.pk)
    cancel_run(run_id=run.pk)
    engine.record_model_answer(plan.step, *_answer("late answer"), route="scripted:demo")
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED and run.result is None
    assert run.steps.get().status == Step.Status.CANCELLED


def _answer(text):
    from agents.providers import ModelResponse

    return ModelResponse(text=text, tool_calls=[], input_tokens=1, output_tokens=1), 5


def test_session_runs_see_earlier_turns_and_never_interleave(make_agent):
    agent = make_agent(script=[{"text": "echo: {input}"}])
    session = start_session(agent=agent)
    first = submit_run(agent=agent, input="my name is Ada", session=session)
    second = submit_run(agent=agent, input="what is my name?", session=session)

    engine.advance(second.pk)  # the first run has not finished: the second must wait
    assert Run.objects.get(pk=second.pk).status == Run.Status.QUEUED

    drive(first.pk)
    plan = engine.plan(second.pk)
    assert [m["content"] for m in plan.messages] == [
        "my name is Ada",
        "echo: my name is Ada",
        "what is my name?",
    ]


def test_editing_an_agent_publishes_a_version_and_runs_keep_theirs(make_agent):
    agent = make_agent(script=[{"text": "v1"}])
    run = submit_run(agent=agent, input="hi")
    v1 = agent.current_version

    save_agent(agent=agent)  # no change: no new version
    assert agent.versions.count() == 1

    agent.script = [{"text": "v2"}]
    save_agent(agent=agent)
    assert agent.current_version.number == 2
    assert drive(run.pk).result == "v1" and run.agent_version == v1
    assert drive(submit_run(agent=agent, input="hi").pk).result == "v2"


def test_submission_errors_are_domain_errors(make_agent):
    agent = make_agent(script=[{"text": "x"}])
    with pytest.raises(AgentNotFound):
        submit_run(agent="no-such-agent", input="hi")
    with pytest.raises(InvalidRunInput, match="must not be empty"):
        submit_run(agent=agent, input="   ")
    with pytest.raises(InvalidRunInput, match="string or a JSON object"):
        submit_run(agent=agent, input=[1, 2])
    with pytest.raises(InvalidRunInput, match="invalid model route"):
        submit_run(agent=agent, input="hi", model_route="no route")
    with pytest.raises(InvalidRunInput, match="bytes; the limit is"):
        submit_run(agent=agent, input="x" * 300_000)
    agent.is_active = False
    save_agent(agent=agent)
    with pytest.raises(AgentUnavailable):
        submit_run(agent=agent, input="hi")
    assert not Run.objects.exists()


def deeply_nested(depth: int) -> dict:
    """``depth`` nested dicts, built without recursion."""
    value: dict = {}
    node = value
    for _ in range(depth - 1):
        node["a"] = {}
        node = node["a"]
    return value


def contains_itself() -> dict:
    value: dict = {"name": "loop"}
    value["self"] = value
    return value


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"input": deeply_nested(5000)}, "input", "nest more than 64 levels deep"),
        ({"input": deeply_nested(65)}, "input", "nest more than 64 levels deep"),
        ({"input": "x", "metadata": deeply_nested(5000)}, "metadata", "64 levels"),
        ({"input": contains_itself()}, "input", "64 levels"),
        ({"input": {"a": "\ud800"}}, "input", "surrogate characters \\(U\\+D800\\)"),
        ({"input": "x", "metadata": {"\udcff": 1}}, "metadata", "surrogate characters"),
        ({"input": "caf\udce9"}, "input", "surrogate characters"),  # argv's surrogateescape
        ({"input": {"a": [float("nan")]}}, "input", "NaN or Infinity"),
        ({"input": {"a": "x\x00"}}, "input", "NUL characters"),
    ],
    ids=["deep", "65", "deep-metadata", "cycle", "surrogate", "key", "argv", "nan", "nul"],
)
def test_an_unstorable_value_is_refused_before_any_write(make_agent, fields, field, words):
    agent = make_agent(script=[{"text": "x"}])

    with pytest.raises(InvalidRunInput, match=words) as refused:
        submit_run(agent=agent, **fields)

    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field} must not ")
    assert not Run.objects.exists()


def test_a_value_nested_to_the_limit_is_stored(make_agent):
    agent = make_agent(script=[{"text": "x"}])
    run = submit_run(agent=agent, input=deeply_nested(64), metadata=deeply_nested(64))
    run.refresh_from_db()
    assert run.input == deeply_nested(64) and run.metadata == deeply_nested(64)


def test_audit_events_are_append_only(make_agent):
    agent = make_agent(script=[{"text": "x"}])
    run = submit_run(agent=agent, input="hi")
    event = AuditEvent.objects.filter(run=run).first()
    event.action = "forged"
    with pytest.raises(Exception, match="append-only"):
        event.save()
    with pytest.raises(Exception, match="append-only"):
        event.delete()


def test_batched_audit_events_are_written_in_order_with_their_transaction(make_agent):
    from django.db import transaction

    from audittrail import writer as audit

    run = submit_run(agent=make_agent(script=[{"text": "x"}]), input="hi")
    before = AuditEvent.objects.filter(run=run).count()
    with transaction.atomic(), audit.batched():
        audit.record("test.first", run=run)
        with audit.batched():  # a nested block joins the outer one
            audit.record("test.second", run=run, payload={"n": 2})
        assert AuditEvent.objects.filter(run=run).count() == before  # not written yet
    actions = list(AuditEvent.objects.filter(run=run).values_list("action", flat=True))
    assert actions[before:] == ["test.first", "test.second"]

    with pytest.raises(RuntimeError), transaction.atomic(), audit.batched():
        audit.record("test.rolled_back", run=run)
        raise RuntimeError("the change fails")
    assert not AuditEvent.objects.filter(run=run, action="test.rolled_back").exists()
    audit.record("test.unbatched", run=run)  # the failed block left no buffer behind
    assert AuditEvent.objects.filter(run=run, action="test.unbatched").exists()


def test_a_tool_call_whose_worker_dies_every_time_fails_instead_of_repeating(make_agent):
    from agents.engine.tool_step import claim as _claim

    agent = make_agent(tools=["calculator"], script=SEARCH_THEN_ANSWER)
    run = submit_run(agent=agent, input="2+2")
    engine.advance(run.pk)
    for attempt in range(1, 5):  # calculator: 3 retries, so 4 attempts in all
        step = _claim(run.pk, 1)
        assert step is not None and step.attempts == attempt
        Step.objects.filter(pk=step.pk).update(lease_expires_at=timezone.now())  # worker lost
    assert _claim(run.pk, 1) is None

    step = Step.objects.get(run=run, index=1)
    lost = "attempt 4 (the last allowed) was lost"
    assert step.status == Step.Status.FAILED and lost in step.error
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED and lost in run.result


def test_a_wait_longer_than_a_broker_message_may_carry_is_kept_in_postgres(
    make_agent, settings, fake_openai, django_capture_on_commit_callbacks
):
    """A provider asking to wait longer than AGENTSITE_MAX_COUNTDOWN: no message carries the
    wait (Redis would redeliver it past its visibility timeout); the step's not_before does,
    and the reconciler nudges the run once it is due."""
    from agents import reconciler

    model = f"long-wait-{uuid.uuid4().hex[:8]}"
    settings.AGENTSITE_PROVIDERS = {
        "fake": {"base_url": fake_openai.base_url, "api_key": "sk-test-long-wait"}
    }
    settings.AGENTSITE_MAX_COUNTDOWN = 10
    settings.AGENTSITE_STALLED_AFTER = 0
    fake_openai.configure(model=model, error_rate=1.0, error_status=429, retry_after=1000)
    run = submit_run(agent=make_agent(model_route=f"fake:{model}"), input="hi")

    outcome = engine.advance(run.pk)

    assert outcome.retry_in is None  # no retry message
    step = Step.objects.get(run=run)
    wait = (step.not_before - timezone.now()).total_seconds()
    assert step.status == Step.Status.PENDING and 990 < wait <= 1000  # the provider's wish
    with django_capture_on_commit_callbacks() as published:
        assert reconciler.reconcile_stalled_runs() == 0  # not due yet
    assert published == []

    Step.objects.filter(pk=step.pk).update(not_before=timezone.now())  # time passes
    Run.objects.filter(pk=run.pk).update(updated_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks() as published:
        assert reconciler.reconcile_stalled_runs() == 1
    assert len(published) == 1
