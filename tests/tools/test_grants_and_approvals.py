"""Least privilege in the engine: grants, the catalogue switch, constraints, approvals."""

from __future__ import annotations

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from pydantic import BaseModel, Field

from agents import engine
from agents.engine import execute_tool_call
from agents.models import Run, Step
from agents.services import cancel_run, save_agent, submit_run
from agentsite import breaker
from approvals.models import Approval
from approvals.services import AlreadyDecided, DecisionError, decide
from audittrail.models import AuditEvent
from tests.support.engine import drive
from tools import policy
from tools.models import OutboxMessage, Tool, ToolGrant
from tools.registry import ToolSpec, registry

CALC = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "{tool_results}"},
]


def actions(run: Run) -> list[str]:
    return list(AuditEvent.objects.filter(run=run).values_list("action", flat=True))


def tool_step(run: Run, index: int = 1) -> Step:
    return Step.objects.get(run=run, index=index)


@pytest.fixture(autouse=True)
def closed_circuits():
    for name in registry.names():
        breaker.reset(name)


# --- grants and the catalogue ----------------------------------------------------------------


def test_a_disabled_tool_is_refused_audited_and_no_longer_offered(make_agent):
    agent = make_agent(tools=["calculator"], script=CALC)
    Tool.objects.filter(name="calculator").update(enabled=False)

    run = drive(submit_run(agent=agent, input="2+2").pk)

    step = tool_step(run)
    assert step.status == Step.Status.REFUSED and step.attempts == 0
    assert step.error == "tool 'calculator' is disabled by an operator"
    assert Step.objects.get(run=run, index=0).request["tools"] == []  # not shown to the model
    refused = AuditEvent.objects.get(run=run, action="tool_call.refused")
    assert refused.payload == {"tool": "calculator", "reason": step.error}
    assert run.status == Run.Status.SUCCEEDED and "disabled by an operator" in run.result


def test_arguments_that_break_the_grants_constraints_are_refused_without_executing(make_agent):
    agent = make_agent(
        grants={"calculator": {"constraints": {"expression": {"max_length": 3}}}}, script=CALC
    )
    run = drive(submit_run(agent=agent, input="12345+1").pk)

    step = tool_step(run)
    assert step.status == Step.Status.REFUSED and step.response is None
    assert step.error == (
        "arguments for calculator break the agent's grant: expression is 7 characters; "
        "the most allowed is 3"
    )
    assert "tool_call.refused" in actions(run) and "tool_call.succeeded" not in actions(run)

    ok = drive(submit_run(agent=agent, input="1+1").pk)
    assert tool_step(ok).status == Step.Status.SUCCEEDED and tool_step(ok).response["result"] == 2


def test_revoking_a_grant_applies_to_a_run_already_in_flight(make_agent):
    agent = make_agent(tools=["calculator"], script=CALC)
    run = submit_run(agent=agent, input="2+2")
    ToolGrant.objects.filter(agent=agent).delete()  # after the run pinned its version

    run = drive(run.pk)
    assert tool_step(run).status == Step.Status.REFUSED
    assert "not available to this agent" in tool_step(run).error


def test_a_grant_added_later_does_not_widen_a_run_in_flight(make_agent):
    agent = make_agent(tools=[], script=CALC)
    run = submit_run(agent=agent, input="2+2")
    save_agent(agent=agent, grants=["calculator"])  # version 2; the run keeps version 1

    run = drive(run.pk)
    assert tool_step(run).status == Step.Status.REFUSED
    assert drive(submit_run(agent=agent, input="2+2").pk).status == Run.Status.SUCCEEDED
    later = Run.objects.exclude(pk=run.pk).get(agent=agent)
    assert tool_step(later).status == Step.Status.SUCCEEDED


def test_a_call_whose_circuit_is_open_fails_at_once_and_the_model_is_told(make_agent, settings):
    settings.AGENTSITE_BREAKER_FAILURES = 2
    agent = make_agent(tools=["calculator"], script=CALC)
    breaker.record_failure("calculator")
    breaker.record_failure("calculator")

    run = drive(submit_run(agent=agent, input="2+2").pk)

    step = tool_step(run)
    assert step.status == Step.Status.FAILED and step.attempts == 0
    assert "temporarily unavailable after repeated failures (circuit open)" in step.error
    assert "tool_call.short_circuited" in actions(run)
    assert run.status == Run.Status.SUCCEEDED and "temporarily unavailable" in run.result


def test_set_grants_rejects_unknown_tools_and_bad_constraints(make_agent):
    agent = make_agent(tools=["calculator"])
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="Unknown tools: rm_rf"):
        save_agent(agent=agent, grants=["calculator", "rm_rf"])
    with pytest.raises(ValidationError, match="not an argument of this tool"):
        save_agent(agent=agent, grants={"calculator": {"constraints": {"x": {"max": 1}}}})
    assert list(agent.grants.values_list("tool__name", flat=True)) == ["calculator"]
    assert agent.versions.count() == 1


# --- sync_tools ------------------------------------------------------------------------------


def test_sync_tools_mirrors_the_registry_bumps_versions_and_never_deletes(db):
    from pydantic import BaseModel

    from tools.registry import ToolSpec

    class Args(BaseModel):
        text: str

    spec = ToolSpec(
        name="echo_sync_test", description="Echo.", args_model=Args, func=lambda a, c: a
    )
    registry.register(spec)
    try:
        out = StringIO()
        call_command("sync_tools", stdout=out)
        assert "created: echo_sync_test" in out.getvalue()
        row = Tool.objects.get(name="echo_sync_test")
        assert row.version == 1 and row.available and row.enabled
        assert row.parameters_schema["properties"]["text"]["type"] == "string"
        Tool.objects.filter(pk=row.pk).update(enabled=False)  # an operator's switch

        registry._tools["echo_sync_test"] = ToolSpec(
            name="echo_sync_test", description="Echo, louder.", args_model=Args, func=spec.func
        )
        out = StringIO()
        call_command("sync_tools", stdout=out)
        assert "updated: echo_sync_test" in out.getvalue()
        row.refresh_from_db()
        assert row.version == 2 and row.description == "Echo, louder."
        assert row.enabled is False  # left as the operator set it

        out = StringIO()
        call_command("sync_tools", stdout=out)
        assert "0 created, 0 updated, 0 marked unavailable" in out.getvalue()
        row.refresh_from_db()
        assert row.version == 2
    finally:
        registry._tools.pop("echo_sync_test")
    out = StringIO()
    call_command("sync_tools", stdout=out)
    assert "marked unavailable: echo_sync_test" in out.getvalue()
    row.refresh_from_db()
    assert row.available is False and Tool.objects.filter(name="echo_sync_test").exists()


def test_every_registered_tool_is_in_the_catalogue_after_migrate(db):
    assert set(registry.names()) <= set(
        Tool.objects.filter(available=True).values_list("name", flat=True)
    )
    send_email = Tool.objects.get(name="send_email")
    assert send_email.side_effects and send_email.default_mode == "require_approval"


# --- approvals -------------------------------------------------------------------------------


def approval_agent(make_agent, **grant):
    return make_agent(
        grants={"calculator": {"mode": "require_approval", **grant}},
        script=CALC,
    )


def test_a_require_approval_call_pauses_the_run_with_a_bound_record(make_agent):
    agent = approval_agent(make_agent)
    run = drive(submit_run(agent=agent, input="6*7").pk)

    assert run.status == Run.Status.WAITING_APPROVAL
    step = tool_step(run)
    assert step.status == Step.Status.AWAITING_APPROVAL and step.attempts == 0
    approval = Approval.objects.get(run=run)
    assert approval.status == Approval.Status.PENDING
    assert approval.reason == "tool_requires_approval" and approval.tool_name == "calculator"
    assert approval.proposed_arguments == {"expression": "6*7"}
    assert len(approval.proposed_digest) == 64
    assert actions(run)[-3:] == [
        "tool_call.requested",
        "approval.requested",
        "run.waiting_approval",
    ]


def test_approving_runs_the_call_once_and_the_run_resumes(make_agent, admin_user):
    agent = approval_agent(make_agent)
    run = drive(submit_run(agent=agent, input="6*7").pk)
    approval = Approval.objects.get(run=run)

    decided = decide(approval.pk, decision="approve", user=admin_user, comment="fine")

    assert decided.status == Approval.Status.APPROVED and decided.decided_by == admin_user
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED
    step = tool_step(run)
    assert step.status == Step.Status.SUCCEEDED and step.attempts == 1
    assert step.response["result"] == 42
    approval.refresh_from_db()
    assert approval.consumed_at is not None
    story = actions(run)
    assert story.index("approval.approved") < story.index("run.resumed")
    assert story.index("run.resumed") < story.index("tool_call.succeeded")
    event = AuditEvent.objects.get(run=run, action="approval.approved")
    assert event.actor == admin_user.username and event.payload["edited"] is False


def test_edit_then_approve_runs_the_edited_arguments_validated_like_the_original(
    make_agent, admin_user
):
    agent = approval_agent(make_agent, constraints={"expression": {"max_length": 5}})
    run = drive(submit_run(agent=agent, input="6*7").pk)
    approval = Approval.objects.get(run=run)

    with pytest.raises(DecisionError) as bad_schema:
        decide(approval.pk, decision="edit", user=admin_user, arguments={"expr": "1"})
    assert bad_schema.value.field == "arguments" and "Field required" in str(bad_schema.value)
    with pytest.raises(DecisionError, match="break the agent's grant"):
        decide(approval.pk, decision="edit", user=admin_user, arguments={"expression": "123456"})
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING  # a refused edit decides nothing

    decide(approval.pk, decision="edit", user=admin_user, arguments={"expression": "6*8"})
    run = drive(run.pk)
    step = tool_step(run)
    assert run.status == Run.Status.SUCCEEDED and step.response["result"] == 48
    assert step.request["proposed_arguments"] == {"expression": "6*7"}
    assert AuditEvent.objects.get(run=run, action="approval.approved").payload["edited"] is True


def test_a_decision_is_taken_once(make_agent, admin_user):
    agent = approval_agent(make_agent)
    run = drive(submit_run(agent=agent, input="6*7").pk)
    approval = Approval.objects.get(run=run)
    decide(approval.pk, decision="approve", user=admin_user)

    with pytest.raises(AlreadyDecided, match="already approved"):
        decide(approval.pk, decision="reject", user=admin_user, comment="too late")
    assert AuditEvent.objects.filter(run=run, action__startswith="approval.").count() == 2


def test_rejecting_tells_the_model_why_and_the_tool_never_runs(make_agent, admin_user):
    agent = approval_agent(make_agent)
    run = drive(submit_run(agent=agent, input="6*7").pk)
    approval = Approval.objects.get(run=run)

    with pytest.raises(DecisionError, match="needs a comment"):
        decide(approval.pk, decision="reject", user=admin_user, comment="  ")
    decide(approval.pk, decision="reject", user=admin_user, comment="not today")

    run = drive(run.pk)
    step = tool_step(run)
    assert step.status == Step.Status.REFUSED and step.attempts == 0 and step.response is None
    assert run.status == Run.Status.SUCCEEDED
    assert "a human reviewer rejected this call: not today" in run.result


def test_an_approved_call_whose_arguments_were_changed_afterwards_does_not_run(
    make_agent, admin_user
):
    agent = approval_agent(make_agent)
    run = drive(submit_run(agent=agent, input="6*7").pk)
    decide(Approval.objects.get(run=run).pk, decision="approve", user=admin_user)
    step = tool_step(run)
    Step.objects.filter(pk=step.pk).update(
        request={**step.request, "arguments": {"expression": "9*9"}}
    )

    run = drive(run.pk)
    step.refresh_from_db()
    assert step.status == Step.Status.REFUSED and step.response is None
    assert "differ from what the reviewer approved" in step.error


def test_allowed_calls_of_a_turn_run_while_another_waits_for_review(make_agent, admin_user):
    script = [
        {
            "tool_calls": [
                {"name": "calculator", "arguments": {"expression": "1+1"}},
                {"name": "knowledge_search", "arguments": {"query": "refund"}},
            ]
        },
        {"text": "{tool_results}"},
    ]
    agent = make_agent(
        grants={"calculator": "allow", "knowledge_search": "require_approval"}, script=script
    )
    run = drive(submit_run(agent=agent, input="go").pk)
    assert run.status == Run.Status.WAITING_APPROVAL
    assert tool_step(run, 1).status == Step.Status.SUCCEEDED  # ran while the other waits
    assert tool_step(run, 2).status == Step.Status.AWAITING_APPROVAL
    assert Step.objects.filter(run=run, kind=Step.Kind.MODEL).count() == 1

    decide(Approval.objects.get(run=run).pk, decision="approve", user=admin_user)
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED
    assert tool_step(run, 2).status == Step.Status.SUCCEEDED


def test_cancelling_a_waiting_run_cancels_its_approval(make_agent, admin_user):
    agent = approval_agent(make_agent)
    run = drive(submit_run(agent=agent, input="6*7").pk)

    cancel_run(run_id=run.pk)

    run.refresh_from_db()
    approval = Approval.objects.get(run=run)
    assert run.status == Run.Status.CANCELLED
    assert approval.status == Approval.Status.CANCELLED
    assert tool_step(run).status == Step.Status.CANCELLED
    assert "approval.cancelled" in actions(run)
    with pytest.raises(AlreadyDecided):
        decide(approval.pk, decision="approve", user=admin_user)


# --- edges found in review -------------------------------------------------------------------


def test_a_stray_message_never_runs_a_held_call(make_agent, admin_user):
    agent = approval_agent(make_agent)
    run = drive(submit_run(agent=agent, input="6*7").pk)
    # The operator relaxes the grant meanwhile; a duplicate task arrives for the held step.
    ToolGrant.objects.filter(agent=agent).update(mode="allow")
    execute_tool_call(run_id=run.pk, step_index=1)

    step = tool_step(run)
    assert step.status == Step.Status.AWAITING_APPROVAL and step.attempts == 0
    decide(Approval.objects.get(run=run).pk, decision="approve", user=admin_user)
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED and tool_step(run).response["result"] == 42


class PayArgs(BaseModel):
    amount: Decimal
    from_: str = Field(alias="from")


@pytest.fixture
def pay_tool(db):
    spec = ToolSpec(
        name="pay_test", description="Pay.", args_model=PayArgs, func=lambda a, c: {"ok": True}
    )
    registry.register(spec)
    yield spec
    registry._tools.pop("pay_test")


def test_constraints_hold_for_decimal_and_aliased_arguments(make_agent, pay_tool):
    agent = make_agent(
        grants={"pay_test": {"constraints": {"amount": {"max": 100}, "from": {"one_of": ["ops"]}}}}
    )
    run = submit_run(agent=agent, input="pay")

    verdict = policy.authorize(run, "pay_test", {"amount": "1000000", "from": "ops"})
    assert "amount is 1000000; the most allowed is 100" in verdict.refusal
    verdict = policy.authorize(run, "pay_test", {"amount": "5", "from": "mallory"})
    assert "from must be one of ops" in verdict.refusal
    assert policy.authorize(run, "pay_test", {"amount": "99.5", "from": "ops"}).allowed


def test_a_numeric_rule_on_a_text_argument_is_refused_when_granting(make_agent, pay_tool):
    from django.core.exceptions import ValidationError

    agent = make_agent(tools=[])
    with pytest.raises(ValidationError, match="from is not a number"):
        save_agent(agent=agent, grants={"pay_test": {"constraints": {"from": {"max": 3}}}})


def test_a_run_in_flight_is_held_to_its_versions_constraints_inside_the_tool(make_agent):
    from tools.email import SendEmailArgs, send_email
    from tools.registry import ToolArgumentsInvalid, ToolContext

    ctx = ToolContext(
        run_id="r",
        step_index=1,
        idempotency_key="r:1:widened",
        attempt=1,
        tool="send_email",
        constraints={"to": {"email_domains": ["a.com", "b.com"]}},
        constraint_sets=(
            {"to": {"email_domains": ["a.com"]}},
            {"to": {"email_domains": ["a.com", "b.com"]}},
        ),
    )
    args = SendEmailArgs(to=["x@a.com"], cc=["y@b.com"], subject="Hi", body="Hello")
    with pytest.raises(ToolArgumentsInvalid, match="b.com"):
        send_email(args, ctx)


def test_nothing_is_recorded_in_the_outbox_for_a_finished_run(make_agent):
    from tools import outbox
    from tools.registry import ToolContext, ToolError

    agent = make_agent(script=CALC)
    run = submit_run(agent=agent, input="1")
    cancel_run(run_id=run.pk)
    ctx = ToolContext(
        run_id=str(run.pk), step_index=1, idempotency_key=f"{run.pk}:1", attempt=1, tool="t"
    )
    with pytest.raises(ToolError, match="the run is cancelled"):
        outbox.record(ctx, kind="email", payload={})
    assert not OutboxMessage.objects.exists()


def test_the_reconciler_resends_calls_that_are_not_held_in_a_waiting_run(
    make_agent, admin_user, settings
):
    from agents.reconciler import reconcile_stalled_runs

    settings.AGENTSITE_STALLED_AFTER = 0
    script = [
        {
            "tool_calls": [
                {"name": "calculator", "arguments": {"expression": "1+1"}},
                {"name": "knowledge_search", "arguments": {"query": "refund"}},
            ]
        },
        {"text": "{tool_results}"},
    ]
    agent = make_agent(
        grants={"calculator": "allow", "knowledge_search": "require_approval"}, script=script
    )
    run = submit_run(agent=agent, input="go")
    engine.advance(run.pk)  # the model turn; the allowed call's message is then "lost"
    run.refresh_from_db()
    assert run.status == Run.Status.WAITING_APPROVAL

    assert reconcile_stalled_runs() == 1
    nudge = AuditEvent.objects.get(run=run, action="run.nudged")
    assert nudge.payload == {"tool_steps": [1]}

    execute_tool_call(run_id=run.pk, step_index=1)
    assert reconcile_stalled_runs() == 0  # only the reviewer's decision moves it now
