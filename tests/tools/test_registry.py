"""The tool registry, and executing tool steps with agents.engine.execute_tool_call."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from pydantic import BaseModel, Field

from agents import engine
from agents.engine import execute_tool_call
from agents.models import Run, Step
from agents.services import submit_run
from audittrail.models import AuditEvent
from tests.support.engine import drive
from tools.registry import (
    ToolArgumentsInvalid,
    ToolContext,
    ToolError,
    ToolRegistry,
    ToolSpec,
    TransientToolError,
    registry,
    tool,
)


class EchoArgs(BaseModel):
    """Echo a value back."""

    value: str = Field(description="What to echo.")
    times: int = Field(default=1, ge=1, le=3)


@pytest.fixture
def tool_name():
    """A unique tool name, unregistered from the global registry after the test."""
    names: list[str] = []

    def new() -> str:
        name = f"test_tool_{uuid.uuid4().hex[:10]}"
        names.append(name)
        return name

    yield new
    for name in names:
        registry._tools.pop(name, None)


# --- the registry ----------------------------------------------------------------------------


def test_a_tool_without_a_pydantic_first_parameter_is_a_type_error(tool_name):
    name = tool_name()

    def untyped(args, ctx):
        return None

    def wrong_type(args: dict, ctx: ToolContext) -> None:
        return None

    def no_params() -> None:
        return None

    for func in (untyped, wrong_type, no_params):
        with pytest.raises(TypeError, match=f"tool '{name}': first parameter must be annotated"):
            tool(name=name, description="d")(func)
    assert name not in registry


def test_registering_two_functions_under_one_name_is_a_value_error(tool_name):
    name = tool_name()

    def first(args: EchoArgs, ctx: ToolContext) -> str:
        return "first"

    def second(args: EchoArgs, ctx: ToolContext) -> str:
        return "second"

    assert tool(name=name, description="d")(first) is first
    assert name in registry and name in registry.names()
    with pytest.raises(ValueError, match=f"a tool named '{name}' is already registered"):
        tool(name=name, description="d")(second)
    assert registry.get(name).func is first
    # Registering the very same function again (a module imported twice) is fine.
    tool(name=name, description="d")(first)
    assert registry.get(name).func is first


def test_the_decorator_records_the_spec(tool_name):
    name = tool_name()

    @tool(name=name, description="Echo.", risk="high", timeout=7, retries=1)
    def echo(args: EchoArgs, ctx: ToolContext) -> str:
        return args.value * args.times

    spec = registry.get(name)
    assert spec == ToolSpec(
        name=name,
        description="Echo.",
        args_model=EchoArgs,
        func=echo,
        risk="high",
        timeout=7,
        retries=1,
    )
    assert echo(EchoArgs(value="ab", times=2), None) == "abab"  # still a plain function


def test_a_separate_registry_keeps_its_own_tools():
    other = ToolRegistry()
    spec = ToolSpec(name="x", description="d", args_model=EchoArgs, func=lambda a, c: None)
    other.register(spec)
    assert other.names() == ["x"] and "x" in other and other.get("x") is spec
    assert other.get("y") is None and "y" not in other


def test_the_openai_schema():
    schema = registry.get("calculator").openai_schema()
    assert set(schema) == {"type", "function"}
    assert schema["type"] == "function"
    function = schema["function"]
    assert set(function) == {"name", "description", "parameters"}
    assert function["name"] == "calculator" and function["description"]
    parameters = function["parameters"]
    assert "title" not in parameters
    assert parameters["type"] == "object"
    assert parameters["required"] == ["expression"]
    assert parameters["properties"]["expression"]["maxLength"] == 200
    assert parameters["properties"]["expression"]["type"] == "string"


def test_the_schema_of_a_custom_tool_uses_its_args_model(tool_name):
    name = tool_name()

    @tool(name=name, description="Echo.")
    def echo(args: EchoArgs, ctx: ToolContext) -> str:
        return args.value

    parameters = registry.get(name).openai_schema()["function"]["parameters"]
    assert "title" not in parameters
    assert parameters["properties"]["value"]["description"] == "What to echo."
    assert parameters["properties"]["times"]["maximum"] == 3
    assert parameters["required"] == ["value"]


@pytest.mark.parametrize(
    ("arguments", "type_name"),
    [([1, 2], "list"), ("1+1", "str"), (None, "NoneType"), (3, "int")],
)
def test_validating_a_non_object_is_refused(arguments, type_name):
    with pytest.raises(ToolArgumentsInvalid) as info:
        registry.get("calculator").validate(arguments)
    assert str(info.value) == (f"arguments for calculator must be a JSON object, got {type_name}")
    assert isinstance(info.value, ToolError)


def test_validation_errors_name_every_field():
    with pytest.raises(ToolArgumentsInvalid) as info:
        registry.get("knowledge_search").validate({"query": "", "limit": "many"})
    message = str(info.value)
    assert message.startswith("invalid arguments for knowledge_search: ")
    assert "query: " in message and "limit: " in message


def test_valid_arguments_become_the_args_model():
    args = registry.get("knowledge_search").validate({"query": "refund"})
    assert args.query == "refund" and args.limit == 3


# --- execute_tool_call -----------------------------------------------------------------------


def start_tool_step(make_agent, name: str, arguments: dict | None = None) -> Run:
    """A run whose model asked for one call of ``name``: step 1, pending."""
    script = [
        {"tool_calls": [{"name": name, "arguments": arguments or {"value": "{input}"}}]},
        {"text": "tool said: {last_tool_result}"},
    ]
    agent = make_agent(tools=[name], script=script)
    run = submit_run(agent=agent, input="hello")
    engine.advance(run.pk)
    step = Step.objects.get(run=run, index=1)
    assert step.kind == Step.Kind.TOOL and step.status == Step.Status.PENDING
    return run


def tool_step(run: Run) -> Step:
    return Step.objects.get(run=run, index=1)


def actions(run: Run) -> list[str]:
    return list(AuditEvent.objects.filter(run=run).values_list("action", flat=True))


@pytest.mark.django_db
def test_a_successful_call_records_its_result_and_context(make_agent, tool_name):
    name = tool_name()
    seen: list[ToolContext] = []

    @tool(name=name, description="Echo.")
    def echo(args: EchoArgs, ctx: ToolContext) -> dict:
        seen.append(ctx)
        return {"echo": args.value}

    run = start_tool_step(make_agent, name)
    outcome = execute_tool_call(run_id=run.pk, step_index=1)

    step = tool_step(run)
    assert outcome.retry_in is None
    assert step.status == Step.Status.SUCCEEDED and step.response == {"echo": "hello"}
    assert step.attempts == 1 and step.error == "" and step.latency_ms is not None
    (ctx,) = seen
    assert ctx.run_id == str(run.pk) and ctx.step_index == 1 and ctx.attempt == 1
    assert ctx.idempotency_key == f"{run.pk}:1:call_0_0" == step.idempotency_key
    # Running the step again does nothing: it is done.
    execute_tool_call(run_id=run.pk, step_index=1)
    assert len(seen) == 1
    assert drive(run.pk).result == 'tool said: {"echo": "hello"}'


@pytest.mark.django_db
def backoff_elapses(run):
    Step.objects.filter(run=run, status=Step.Status.PENDING).update(not_before=None)


def test_a_transient_error_is_retried_with_the_same_idempotency_key_then_gives_up(
    make_agent, tool_name
):
    name = tool_name()
    seen: list[ToolContext] = []

    @tool(name=name, description="Always flaky.", retries=2, timeout=9)
    def flaky(args: EchoArgs, ctx: ToolContext) -> str:
        seen.append(ctx)
        raise TransientToolError("upstream 503")

    run = start_tool_step(make_agent, name)
    spec = registry.get(name)

    for attempt in range(1, spec.retries + 1):
        outcome = execute_tool_call(run_id=run.pk, step_index=1)
        step = tool_step(run)
        assert outcome.retry_in is not None and outcome.retry_in > 0
        assert step.not_before is not None
        assert execute_tool_call(run_id=run.pk, step_index=1).retry_in is None  # too early
        assert tool_step(run).attempts == attempt
        backoff_elapses(run)
        assert outcome.timeout == 9
        assert step.status == Step.Status.PENDING and step.attempts == attempt
        assert step.error == "TransientToolError: upstream 503"
        assert step.lease_expires_at is None

    outcome = execute_tool_call(run_id=run.pk, step_index=1)
    step = tool_step(run)
    assert outcome.retry_in is None
    assert step.status == Step.Status.FAILED and step.attempts == spec.retries + 1 == 3
    assert step.error == "gave up after 3 attempts: TransientToolError: upstream 503"

    assert [ctx.attempt for ctx in seen] == [1, 2, 3]
    assert {ctx.idempotency_key for ctx in seen} == {step.idempotency_key}
    assert actions(run).count("step.retry_scheduled") == 2
    assert actions(run).count("tool_call.attempt") == 2
    assert "tool_call.failed" in actions(run)
    # Nothing more happens to a step that gave up.
    assert execute_tool_call(run_id=run.pk, step_index=1).retry_in is None
    assert len(seen) == 3

    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED
    assert (
        run.result == "tool said: Error: gave up after 3 attempts: TransientToolError: upstream 503"
    )


@pytest.mark.django_db
def test_a_transient_error_then_success(make_agent, tool_name):
    name = tool_name()
    keys: list[str] = []

    @tool(name=name, description="Flaky once.")
    def once(args: EchoArgs, ctx: ToolContext) -> str:
        keys.append(ctx.idempotency_key)
        if ctx.attempt == 1:
            raise ConnectionError("reset by peer")
        return "ok"

    run = start_tool_step(make_agent, name)
    assert execute_tool_call(run_id=run.pk, step_index=1).retry_in is not None
    assert tool_step(run).error == "ConnectionError: reset by peer"
    backoff_elapses(run)
    assert execute_tool_call(run_id=run.pk, step_index=1).retry_in is None

    step = tool_step(run)
    assert step.status == Step.Status.SUCCEEDED and step.response == "ok"
    assert step.attempts == 2 and step.error == ""
    assert len(keys) == 2 and keys[0] == keys[1] == step.idempotency_key


@pytest.mark.django_db
def test_a_tool_error_fails_the_step_without_a_retry(make_agent, tool_name):
    name = tool_name()
    calls: list[int] = []

    @tool(name=name, description="Refuses.")
    def refuses(args: EchoArgs, ctx: ToolContext) -> str:
        calls.append(ctx.attempt)
        raise ToolError("no such customer")

    run = start_tool_step(make_agent, name)
    outcome = execute_tool_call(run_id=run.pk, step_index=1)

    step = tool_step(run)
    assert outcome.retry_in is None and calls == [1]
    assert step.status == Step.Status.FAILED and step.error == "no such customer"
    assert step.attempts == 1


@pytest.mark.django_db
def test_a_crashing_tool_fails_the_step_with_the_exception(make_agent, tool_name):
    name = tool_name()

    @tool(name=name, description="Crashes.")
    def crashes(args: EchoArgs, ctx: ToolContext) -> str:
        raise KeyError("customer_id")

    run = start_tool_step(make_agent, name)
    outcome = execute_tool_call(run_id=run.pk, step_index=1)

    step = tool_step(run)
    assert outcome.retry_in is None
    assert step.status == Step.Status.FAILED and step.attempts == 1
    assert step.error == "the tool crashed: KeyError: 'customer_id'"
    assert drive(run.pk).status == Run.Status.SUCCEEDED  # reported to the model, not fatal


@pytest.mark.django_db
def test_non_json_values_are_stored_json_safely(make_agent, tool_name):
    name = tool_name()
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")

    @tool(name=name, description="Returns Python values.")
    def values(args: EchoArgs, ctx: ToolContext) -> dict:
        return {
            "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            "amount": Decimal("12.50"),
            "id": ident,
            "pair": (1, 2),
        }

    run = start_tool_step(make_agent, name)
    execute_tool_call(run_id=run.pk, step_index=1)

    step = tool_step(run)
    assert step.status == Step.Status.SUCCEEDED
    assert step.response == {
        "when": "2024-01-02T03:04:05Z",
        "amount": "12.50",
        "id": str(ident),
        "pair": [1, 2],
    }


@pytest.mark.django_db
def test_a_bare_non_json_value_is_stored_json_safely(make_agent, tool_name):
    name = tool_name()

    @tool(name=name, description="Returns a Decimal.")
    def amount(args: EchoArgs, ctx: ToolContext) -> Decimal:
        return Decimal("0.10")

    run = start_tool_step(make_agent, name)
    execute_tool_call(run_id=run.pk, step_index=1)
    step = tool_step(run)
    assert step.status == Step.Status.SUCCEEDED and step.response == "0.10"


@pytest.mark.django_db
def test_an_unserialisable_value_fails_the_step_clearly(make_agent, tool_name):
    name = tool_name()

    @tool(name=name, description="Returns a set.")
    def a_set(args: EchoArgs, ctx: ToolContext) -> set:
        return {1, 2}

    run = start_tool_step(make_agent, name)
    execute_tool_call(run_id=run.pk, step_index=1)
    step = tool_step(run)
    assert step.status == Step.Status.FAILED
    assert step.error.startswith("the tool crashed: TypeError:")
    assert "set" in step.error


@pytest.mark.django_db
def test_a_tool_uninstalled_after_the_call_was_requested_fails_the_step(make_agent, tool_name):
    name = tool_name()

    @tool(name=name, description="Goes away.")
    def goes_away(args: EchoArgs, ctx: ToolContext) -> str:
        return "never"

    run = start_tool_step(make_agent, name)
    registry._tools.pop(name)
    execute_tool_call(run_id=run.pk, step_index=1)
    step = tool_step(run)
    assert step.status == Step.Status.FAILED
    assert step.error == f"tool '{name}' is no longer installed"


@pytest.mark.django_db
def test_a_missing_run_or_step_is_ignored(make_agent, tool_name):
    assert execute_tool_call(run_id=uuid.uuid4(), step_index=1).retry_in is None
    name = tool_name()

    @tool(name=name, description="Echo.")
    def echo(args: EchoArgs, ctx: ToolContext) -> str:
        return args.value

    run = start_tool_step(make_agent, name)
    assert execute_tool_call(run_id=run.pk, step_index=0).retry_in is None  # a model step
    assert execute_tool_call(run_id=run.pk, step_index=7).retry_in is None
    assert tool_step(run).status == Step.Status.PENDING


@pytest.mark.django_db
def test_a_step_held_by_a_live_worker_is_left_alone_and_taken_over_when_its_lease_expires(
    make_agent, tool_name
):
    name = tool_name()
    seen: list[ToolContext] = []

    @tool(name=name, description="Echo.")
    def echo(args: EchoArgs, ctx: ToolContext) -> str:
        seen.append(ctx)
        return args.value

    run = start_tool_step(make_agent, name)
    live = timezone.now() + timedelta(minutes=5)
    Step.objects.filter(run=run, index=1).update(
        status=Step.Status.RUNNING, attempts=1, lease_expires_at=live
    )
    assert execute_tool_call(run_id=run.pk, step_index=1).retry_in is None
    assert seen == [] and tool_step(run).status == Step.Status.RUNNING

    Step.objects.filter(run=run, index=1).update(lease_expires_at=timezone.now() - timedelta(1))
    execute_tool_call(run_id=run.pk, step_index=1)
    step = tool_step(run)
    assert step.status == Step.Status.SUCCEEDED and step.attempts == 2
    assert [ctx.attempt for ctx in seen] == [2]
    assert seen[0].idempotency_key == step.idempotency_key


@pytest.mark.django_db
def test_a_pending_step_of_a_cancelled_run_is_cancelled_not_run(make_agent, tool_name):
    name = tool_name()
    calls: list[int] = []

    @tool(name=name, description="Echo.")
    def echo(args: EchoArgs, ctx: ToolContext) -> str:
        calls.append(1)
        return args.value

    run = start_tool_step(make_agent, name)
    Run.objects.filter(pk=run.pk).update(status=Run.Status.CANCELLED)
    execute_tool_call(run_id=run.pk, step_index=1)
    assert calls == [] and tool_step(run).status == Step.Status.CANCELLED


@pytest.mark.django_db
def test_a_non_finite_float_result_fails_the_step_instead_of_crashing(make_agent, tool_name):
    name = tool_name()

    @tool(name=name, description="Returns NaN.")
    def nan(args: EchoArgs, ctx: ToolContext) -> dict:
        return {"value": float("nan"), "big": float("inf")}

    run = start_tool_step(make_agent, name)
    execute_tool_call(run_id=run.pk, step_index=1)
    step = tool_step(run)
    assert step.status == Step.Status.FAILED
    assert step.error.startswith("the tool crashed")
