"""Governance in the engine: budgets (steps, tokens, cost, wall time) stop a run before the call
that would pass them; prices give each step its cost; model routes fall back; rate limits and a
provider's 429 put a step off without spending an attempt; canary versions; usage sums."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from agents import engine
from agents.models import ModelPrice, ModelProvider, Run, Step
from agents.providers import routing
from agents.services import (
    promote_canary,
    publish_agent_version,
    roll_back_canary,
    start_session,
    submit_run,
)
from agentsite import breaker
from audittrail.models import AuditEvent
from tests.support.engine import drive

CALC = [{"name": "calculator", "arguments": {"expression": "6*7"}}]


@pytest.fixture
def provider(db, fake_openai):
    """A provider row on the fake model server, with a model name of its own per test."""

    def build(name: str = "fk", **fields: Any) -> str:
        ModelProvider.objects.update_or_create(
            name=name, defaults={"base_url": fake_openai.base_url, **fields}
        )
        return f"{name}:m-{uuid.uuid4().hex[:8]}"

    return build


def actions(run: Run) -> list[str]:
    return list(AuditEvent.objects.filter(run=run).values_list("action", flat=True))


# --- budgets ----------------------------------------------------------------------------------


def test_the_cost_budget_stops_the_run_before_the_call_that_would_pass_it(
    provider, fake_openai, make_agent
):
    route = provider()
    model = route.partition(":")[2]
    fake_openai.configure(model, tool_calls=[CALC] * 50)
    ModelPrice.objects.create(
        route=route, input_per_million=Decimal("1000"), output_per_million=Decimal("2000")
    )
    agent = make_agent(
        model_route=route, tools=["calculator"], max_steps=100, max_cost=Decimal("0.9")
    )
    run = drive(submit_run(agent=agent, input="what is 6*7?").pk)

    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"
    assert "cost" in run.error and "limit is 0.9" in run.error
    model_steps = list(run.steps.filter(kind="model").order_by("index"))
    assert len(model_steps) >= 2 and fake_openai.count(model) == len(model_steps)
    # Each step's cost is its tokens at the table's prices, and the run's is their sum.
    for step in model_steps:
        expected = (step.input_tokens * 1000 + step.output_tokens * 2000) / Decimal(1_000_000)
        assert step.cost == expected.quantize(Decimal("0.000001")) and step.cost > 0
    assert run.cost == sum(s.cost for s in model_steps)
    assert run.cost <= Decimal("0.9")  # stopped before, never after


def test_a_cost_budget_on_a_model_without_a_price_makes_no_call(provider, fake_openai, make_agent):
    route = provider()
    agent = make_agent(model_route=route, max_cost=Decimal("1"))
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"
    assert f"model {route!r} has no price" in run.error
    assert fake_openai.count(route.partition(":")[2]) == 0


def test_a_provider_wide_price_applies_to_its_models(provider, fake_openai, make_agent):
    route = provider()
    ModelPrice.objects.create(
        route="fk:*", input_per_million=Decimal("1"), output_per_million=Decimal("1")
    )
    run = drive(submit_run(agent=make_agent(model_route=route), input="hi").pk)
    assert run.status == Run.Status.SUCCEEDED
    step = run.steps.get()
    assert step.cost == Decimal(step.input_tokens + step.output_tokens) / 1_000_000


def test_the_output_token_budget_stops_the_next_call(make_agent):
    loop = [{"tool_calls": CALC}] * 20
    agent = make_agent(tools=["calculator"], script=loop, max_output_tokens=5)
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.FAILED and "output tokens" in run.error
    before_last = run.output_tokens - run.steps.filter(kind="model").last().output_tokens
    assert before_last < 5 <= run.output_tokens


def test_the_wall_time_budget_stops_the_next_call(make_agent):
    agent = make_agent(tools=["calculator"], script=[{"tool_calls": CALC}] * 5, max_wall_seconds=60)
    run = submit_run(agent=agent, input="hi")
    engine.advance(run.pk)  # turn 1: asks for the calculator
    drive_tools = Step.objects.filter(run=run, kind="tool").values_list("index", flat=True)
    from agents.engine import execute_tool_call

    for index in drive_tools:
        execute_tool_call(run_id=run.pk, step_index=index)
    Run.objects.filter(pk=run.pk).update(started_at=timezone.now() - timedelta(seconds=61))
    run = drive(run.pk)
    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"
    assert "its limit is 60 s" in run.error
    assert run.steps.filter(kind="model").count() == 1


def test_a_run_may_tighten_its_budget_but_not_loosen_it(make_agent):
    from agents.exceptions import InvalidRunInput

    agent = make_agent(script=[{"tool_calls": CALC}] * 10, tools=["calculator"], max_steps=10)
    run = submit_run(agent=agent, input="hi", budget={"max_steps": 3, "max_cost": "0.5"})
    assert run.budget["max_steps"] == 3 and run.budget["max_cost"] == "0.500000"
    with pytest.raises(InvalidRunInput, match="may not exceed the agent's limit of 10") as exc:
        submit_run(agent=agent, input="hi", budget={"max_steps": 11})
    assert exc.value.field == "budget.max_steps"
    with pytest.raises(InvalidRunInput, match="unknown budget keys: steps"):
        submit_run(agent=agent, input="hi", budget={"steps": 1})
    with pytest.raises(InvalidRunInput, match="must be a whole number"):
        submit_run(agent=agent, input="hi", budget={"max_tokens": 1.5})
    tight = submit_run(agent=agent, input="hi", budget={"max_steps": 3})
    assert drive(tight.pk).steps.count() == 3  # the run's own limit applied


# --- routes and fallback ------------------------------------------------------------------------


def test_a_failing_primary_falls_back_and_the_step_records_who_answered(
    provider, fake_openai, make_agent, settings
):
    primary, backup = provider(), provider("bk")
    fake_openai.configure(primary.partition(":")[2], error_rate=1.0, error_status=503)
    agent = make_agent(model_route=primary, fallback_routes=[backup])
    run = drive(submit_run(agent=agent, input="hi").pk)

    assert run.status == Run.Status.SUCCEEDED, run.error
    step = run.steps.get()
    assert step.model_route == backup
    assert step.attempts == settings.AGENTSITE_FALLBACK_AFTER + 1
    assert fake_openai.count(primary.partition(":")[2]) == settings.AGENTSITE_FALLBACK_AFTER
    assert fake_openai.count(backup.partition(":")[2]) == 1
    fallback = AuditEvent.objects.get(run=run, action="step.fallback")
    assert fallback.payload["from"] == primary and fallback.payload["to"] == backup
    answered = AuditEvent.objects.get(run=run, action="step.succeeded")
    assert answered.payload["route"] == backup and answered.payload["instead_of"] == primary
    assert answered.actor == backup


def test_a_non_retryable_error_falls_back_at_once(provider, fake_openai, make_agent):
    primary, backup = provider(), provider("bk")
    fake_openai.configure(primary.partition(":")[2], error_rate=1.0, error_status=404)
    agent = make_agent(model_route=primary, fallback_routes=[backup])
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.SUCCEEDED
    assert fake_openai.count(primary.partition(":")[2]) == 1
    assert run.steps.get().model_route == backup


def test_a_nonsense_answer_falls_back(provider, fake_openai, make_agent):
    primary, backup = provider(), provider("bk")
    fake_openai.configure(primary.partition(":")[2], nonsense="html")
    agent = make_agent(model_route=primary, fallback_routes=[backup])
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.SUCCEEDED and run.steps.get().model_route == backup


def test_an_open_circuit_sends_the_step_straight_to_the_fallback(
    provider, fake_openai, make_agent, settings
):
    primary, backup = provider(), provider("bk")
    for _ in range(settings.AGENTSITE_BREAKER_FAILURES):
        breaker.record_failure(routing.breaker_key(primary))
    agent = make_agent(model_route=primary, fallback_routes=[backup])
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.SUCCEEDED
    assert fake_openai.count(primary.partition(":")[2]) == 0
    assert run.steps.get().model_route == backup and run.steps.get().attempts == 1


def test_when_every_route_fails_for_good_the_run_fails_naming_the_last_error(
    provider, fake_openai, make_agent
):
    primary, backup = provider(), provider("bk")
    for route in (primary, backup):
        fake_openai.configure(route.partition(":")[2], error_rate=1.0, error_status=400)
    run = drive(
        submit_run(agent=make_agent(model_route=primary, fallback_routes=[backup]), input="x").pk
    )
    assert run.status == Run.Status.FAILED and run.error_code == "provider_error"
    assert "HTTP 400" in run.error
    assert run.steps.get().attempts == 2


def test_routine_turns_use_the_cheaper_route(provider, fake_openai, make_agent):
    primary, cheap = provider(), provider("cheap")
    fake_openai.configure(primary.partition(":")[2], tool_calls=[CALC])
    agent = make_agent(
        model_route=primary,
        routine_route=cheap,
        routine_steps="after_tools",
        tools=["calculator"],
    )
    run = drive(submit_run(agent=agent, input="what is 6*7?").pk)
    assert run.status == Run.Status.SUCCEEDED, run.error
    routes = list(
        run.steps.filter(kind="model").order_by("index").values_list("model_route", flat=True)
    )
    assert routes == [primary, cheap]  # the first turn plans; the one reading results is routine


def test_fallback_routes_are_validated(make_agent):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="not a route"):
        make_agent(fallback_routes=["no-colon"])
    with pytest.raises(ValidationError, match="routine route"):
        make_agent(routine_steps="after_tools")


# --- rate limits and 429 --------------------------------------------------------------------------


def test_a_rate_limited_step_is_put_off_without_spending_an_attempt(
    provider, fake_openai, make_agent
):
    route = provider(requests_per_minute=1)
    agent = make_agent(model_route=route)
    first, second = (submit_run(agent=agent, input=str(i)) for i in range(2))
    engine.advance(first.pk)
    outcome = engine.advance(second.pk)

    assert outcome.retry_in is not None and 0 < outcome.retry_in <= 60 * 1.1 + 1
    step = Step.objects.get(run=second)
    assert (step.status, step.attempts) == (Step.Status.PENDING, 0)
    assert step.not_before > timezone.now()
    assert fake_openai.count(route.partition(":")[2]) == 1
    event = AuditEvent.objects.get(run=second, action="step.rate_limited")
    assert event.payload["reason"] == "rate_limited"
    # Put off again while the window is full; the reconciler or the countdown come back later.
    assert engine.advance(second.pk).retry_in is None  # not yet due: nothing to do


def test_an_agent_limit_holds_back_its_own_runs_only(provider, fake_openai, make_agent):
    route = provider()
    slow, other = (
        make_agent(model_route=route, requests_per_minute=1),
        make_agent(model_route=route),
    )
    engine.advance(submit_run(agent=slow, input="1").pk)
    assert engine.advance(submit_run(agent=slow, input="2").pk).retry_in is not None
    assert engine.advance(submit_run(agent=other, input="3").pk).retry_in is None


def test_a_provider_429_pauses_the_provider_for_every_step_and_spends_no_attempt(
    provider, fake_openai, make_agent
):
    route = provider()
    model = route.partition(":")[2]
    fake_openai.configure(model, fail_first=1, error_status=429, retry_after=30)
    agent = make_agent(model_route=route)
    run, other = submit_run(agent=agent, input="a"), submit_run(agent=agent, input="b")

    outcome = engine.advance(run.pk)
    step = Step.objects.get(run=run)
    assert (step.status, step.attempts, step.request["throttled"]) == ("pending", 0, 1)
    assert step.not_before >= timezone.now() + timedelta(seconds=25)
    assert outcome.retry_in is not None and outcome.retry_in >= 29
    # Another run's step waits too, without a request reaching the provider.
    assert engine.advance(other.pk).retry_in is not None
    assert fake_openai.count(model) == 1
    event = AuditEvent.objects.get(run=run, action="step.rate_limited")
    assert event.payload["reason"] == "provider_429"


def test_a_provider_that_keeps_answering_429_fails_the_run_in_the_end(
    provider, fake_openai, make_agent, settings
):
    route = provider()
    fake_openai.configure(route.partition(":")[2], error_rate=1.0, error_status=429)
    run = submit_run(agent=make_agent(model_route=route), input="a")
    for _ in range(engine.MAX_THROTTLED + settings.AGENTSITE_STEP_MAX_ATTEMPTS + 2):
        _unpause(route)
        Step.objects.filter(run=run).update(not_before=None)
        engine.advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.error_code == "provider_rate_limited"


def _unpause(route: str) -> None:
    import redis
    from django.conf import settings

    from agentsite import rediskeys

    redis.Redis.from_url(settings.REDIS_URL).delete(
        rediskeys.key(
            f"quota:provider:{route.partition(':')[0]}:requests:"
            f"{settings.AGENTSITE_RATE_WINDOW_SECONDS:g}s"
        )
    )


# --- size limits ------------------------------------------------------------------------------


def test_an_answer_over_the_size_limit_is_refused(provider, fake_openai, make_agent, settings):
    settings.AGENTSITE_MAX_MODEL_OUTPUT_CHARS = 50
    route = provider()
    fake_openai.configure(route.partition(":")[2], final="x" * 200)
    run = drive(submit_run(agent=make_agent(model_route=route), input="hi").pk)
    assert run.status == Run.Status.FAILED and run.error_code == "provider_invalid_response"
    assert "the limit is 50" in run.error


def test_a_response_body_over_the_byte_limit_is_not_read_whole(
    provider, fake_openai, make_agent, settings
):
    settings.AGENTSITE_MAX_MODEL_RESPONSE_BYTES = 300
    route = provider()
    fake_openai.configure(route.partition(":")[2], final="y" * 5000)
    run = drive(submit_run(agent=make_agent(model_route=route), input="hi").pk)
    assert run.status == Run.Status.FAILED and "more than 300 bytes" in run.error


# --- canary versions ------------------------------------------------------------------------------


def test_a_canary_takes_its_share_of_new_runs_and_can_be_promoted(make_agent):
    agent = make_agent(script=[{"text": "v1"}])
    v1 = agent.current_version
    agent.script = [{"text": "v2"}]
    agent.save()
    v2 = publish_agent_version(agent=agent, canary_percent=30)
    agent.refresh_from_db()
    assert (agent.current_version, agent.canary_version, agent.canary_percent) == (v1, v2, 30)

    versions = [submit_run(agent=agent, input="x").agent_version_id for _ in range(300)]
    share = versions.count(v2.pk) / len(versions)
    assert 0.2 < share < 0.4  # 30% of 300: well outside this by chance is < 1 in 1000

    session = start_session(agent=agent)
    pinned = {
        submit_run(agent=agent, input="x", session=session).agent_version_id for _ in range(10)
    }
    assert len(pinned) == 1  # a conversation stays on one version

    promote_canary(agent=agent)
    agent.refresh_from_db()
    assert agent.current_version == v2 and agent.canary_version is None
    assert {submit_run(agent=agent, input="x").agent_version_id for _ in range(20)} == {v2.pk}
    assert AuditEvent.objects.filter(action="agent.canary_promoted").exists()


def test_rolling_back_a_canary_restores_the_agents_settings(make_agent):
    agent = make_agent(script=[{"text": "v1"}], tools=["calculator"], max_steps=7)
    v1 = agent.current_version
    agent.script, agent.max_steps = [{"text": "v2"}], 9
    agent.save()
    publish_agent_version(agent=agent, canary_percent=50)

    roll_back_canary(agent=agent)
    agent.refresh_from_db()
    assert agent.canary_version is None and agent.current_version == v1
    assert (agent.script, agent.max_steps) == ([{"text": "v1"}], 7)
    assert list(agent.grants.values_list("tool__name", flat=True)) == ["calculator"]
    # Saving it again publishes nothing: it is v1's configuration.
    assert publish_agent_version(agent=agent) == v1


# --- from a review ------------------------------------------------------------------------------


def test_a_cost_limit_cannot_be_rounded_away(make_agent):
    from agents.exceptions import InvalidRunInput

    agent = make_agent(max_cost=Decimal("5"))
    with pytest.raises(InvalidRunInput, match="at least 0.000001"):
        submit_run(agent=agent, input="x", budget={"max_cost": "0.0000001"})


def test_an_unpriced_fallback_is_not_called_when_the_run_has_a_cost_limit(
    provider, fake_openai, make_agent
):
    primary, backup = provider(), provider("bk")
    ModelPrice.objects.create(
        route=primary, input_per_million=Decimal("1"), output_per_million=Decimal("1")
    )
    fake_openai.configure(primary.partition(":")[2], error_rate=1.0, error_status=404)
    agent = make_agent(model_route=primary, fallback_routes=[backup], max_cost=Decimal("0.5"))
    run = drive(submit_run(agent=agent, input="hi").pk)
    assert run.status == Run.Status.FAILED and "has no price" in run.error
    assert fake_openai.count(backup.partition(":")[2]) == 0


def test_a_request_the_provider_refuses_does_not_open_the_routes_circuit(
    provider, fake_openai, make_agent, settings
):
    route = provider()
    fake_openai.configure(route.partition(":")[2], error_rate=1.0, error_status=400)
    agent = make_agent(model_route=route)
    for _ in range(settings.AGENTSITE_BREAKER_FAILURES + 1):
        assert drive(submit_run(agent=agent, input="x").pk).status == Run.Status.FAILED
    assert breaker.status(routing.breaker_key(route)).state == breaker.CLOSED


def test_an_open_circuit_parks_the_step_without_spending_attempts(
    provider, fake_openai, make_agent, settings
):
    route = provider()
    for _ in range(settings.AGENTSITE_BREAKER_FAILURES):
        breaker.record_failure(routing.breaker_key(route))
    run = submit_run(agent=make_agent(model_route=route), input="x")
    outcome = engine.advance(run.pk)
    step = Step.objects.get(run=run)
    assert (step.status, step.attempts, step.request["throttled"]) == ("pending", 0, 1)
    assert outcome.retry_in is not None and outcome.retry_in >= 1
    assert AuditEvent.objects.get(run=run, action="step.rate_limited").payload["reason"] == (
        "circuit_open"
    )
    assert fake_openai.count(route.partition(":")[2]) == 0


def test_saving_an_agent_during_a_canary_keeps_it_a_canary(make_agent):
    agent = make_agent(script=[{"text": "v1"}])
    v1 = agent.current_version
    agent.script = [{"text": "v2"}]
    agent.save()
    v2 = publish_agent_version(agent=agent, canary_percent=10)
    agent.requests_per_minute = 100  # a live setting: publishes nothing
    agent.save()
    assert publish_agent_version(agent=agent) == v2
    agent.refresh_from_db()
    assert (agent.current_version, agent.canary_version, agent.canary_percent) == (v1, v2, 10)
    # A real change published to everyone replaces the canary, and says so.
    agent.script = [{"text": "v3"}]
    agent.save()
    v3 = publish_agent_version(agent=agent)
    agent.refresh_from_db()
    assert (agent.current_version, agent.canary_version) == (v3, None)
    assert AuditEvent.objects.filter(action="agent.canary_replaced").exists()


def test_a_budget_override_is_clamped_on_a_canary_with_lower_limits(make_agent):
    agent = make_agent(script=[{"text": "v1"}], max_steps=10)
    agent.max_steps = 4
    agent.save()
    v2 = publish_agent_version(agent=agent, canary_percent=50)
    runs = [submit_run(agent=agent, input="x", budget={"max_steps": 6}) for _ in range(40)]
    on_canary = [r for r in runs if r.agent_version_id == v2.pk]
    assert on_canary and {r.budget["max_steps"] for r in on_canary} == {4}
    assert {r.budget["max_steps"] for r in runs if r.agent_version_id != v2.pk} == {6}


def test_the_fallback_event_names_the_route_actually_next(provider, fake_openai, make_agent):
    a, b, c = provider(), provider("bk"), provider("third")
    for route in (a, b):
        fake_openai.configure(route.partition(":")[2], error_rate=1.0, error_status=404)
    run = drive(submit_run(agent=make_agent(model_route=a, fallback_routes=[b, c]), input="x").pk)
    assert run.status == Run.Status.SUCCEEDED and run.steps.get().model_route == c
    moves = [
        (e.payload["from"], e.payload["to"])
        for e in AuditEvent.objects.filter(run=run, action="step.fallback").order_by("id")
    ]
    assert moves == [(a, b), (b, c)]


def test_a_route_passed_over_for_its_failures_is_used_again_when_the_others_are_open(
    settings,
):
    a, b = "fk:tired-" + uuid.uuid4().hex[:6], "bk:open-" + uuid.uuid4().hex[:6]
    for _ in range(settings.AGENTSITE_BREAKER_FAILURES):
        breaker.record_failure(routing.breaker_key(b))
    failures = {a: {"transient": settings.AGENTSITE_FALLBACK_AFTER}}
    choice = routing.choose_route([a, b], failures)
    assert choice.route == a and "circuit is open" in choice.skipped[b]
    assert routing.choose_route([a, b], {a: {"permanent": "404"}}).route is None


def test_a_half_open_probe_taken_by_another_worker_parks_the_step(
    provider, fake_openai, make_agent, settings
):
    settings.AGENTSITE_BREAKER_COOLDOWN = 0.2
    route = provider()
    key = routing.breaker_key(route)
    for _ in range(settings.AGENTSITE_BREAKER_FAILURES):
        breaker.record_failure(key)
    run = submit_run(agent=make_agent(model_route=route), input="x")
    from harness.polling import poll

    poll(lambda: breaker.status(key).state == breaker.HALF_OPEN, timeout=5)
    assert breaker.before_call(key).allowed  # another worker's probe is out
    engine.advance(run.pk)
    step = Step.objects.get(run=run)
    assert (step.status, step.attempts) == ("pending", 0)
    event = AuditEvent.objects.get(run=run, action="step.rate_limited")
    assert event.payload["reason"] in ("circuit_open", "circuit_probe_out")
    assert fake_openai.count(route.partition(":")[2]) == 0
