"""Cumulative grant limits (tools/cumulative.py): splitting a refund into small ones no longer gets
round ``approve_above``/``max``. ``sum_max`` refuses past a running total, ``approve_sum_above``
holds for review past it, ``max_calls`` caps the calls; per run or per session."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from django.db import close_old_connections

from agents import engine
from agents.engine import execute_tool_call
from agents.models import Run, Step
from agents.services import submit_run
from agentsite import breaker
from approvals.models import Approval
from approvals.services import DecisionError, decide
from audittrail.models import AuditEvent
from tests.support.engine import drive
from tools.constraints import constraint_errors
from tools.models import OutboxMessage
from tools.registry import registry


def refunds(*amounts: Any, order: str = "A-1") -> dict[str, Any]:
    """A model turn that calls issue_refund once per amount, in parallel."""
    return {
        "tool_calls": [
            {"name": "issue_refund", "arguments": {"order_id": order, "amount": a, "reason": "x"}}
            for a in amounts
        ]
    }


def refund_agent(make_agent: Any, constraints: dict[str, Any], *turns: dict[str, Any]) -> Any:
    return make_agent(
        grants={"issue_refund": {"mode": "allow", "constraints": constraints}},
        script=[*turns, {"text": "done"}],
        max_steps=40,
    )


def calls(run: Run) -> list[tuple[str, str]]:
    """(status, amount) of each issue_refund call, in order."""
    return [
        (step.status, str(step.request["arguments"]["amount"]))
        for step in Step.objects.filter(run=run, kind="tool").order_by("index")
    ]


def refunded(run: Run) -> Decimal:
    return sum(
        (Decimal(m.payload["amount"]) for m in OutboxMessage.objects.filter(kind="refund")),
        Decimal(0),
    )


def unpublished(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transactional test commits, so its nudges would be published: none is, lest the
    session's worker take the run this test drives itself."""
    monkeypatch.setattr("agents.dispatch._send", lambda *args, **options: None)


@pytest.fixture(autouse=True)
def closed_circuit():
    breaker.reset("issue_refund")


def test_splitting_a_refund_is_refused_past_sum_max(make_agent):
    # The attack: five refunds of 50 per turn, two turns, under max 500 / approve 50.
    agent = refund_agent(
        make_agent,
        {"amount": {"max": 500, "approve_above": 50, "sum_max": 200}},
        refunds(50, 50, 50, 50, 50),
        refunds(50, 50, 50, 50, 50),
    )

    run = drive(submit_run(agent=agent, input="refund it all").pk)

    assert run.status == Run.Status.SUCCEEDED
    assert calls(run) == [("succeeded", "50")] * 4 + [("refused", "50")] * 6
    assert refunded(run) == Decimal(200)
    refused = Step.objects.filter(run=run, status="refused").order_by("index").first()
    assert refused.error == (
        "arguments for issue_refund break the agent's grant: amount 50 would bring this run's "
        "total of issue_refund amount to 250; the most allowed is 200"
    )
    assert AuditEvent.objects.filter(run=run, action="tool_call.refused").count() == 6


def test_past_approve_sum_above_each_call_waits_for_a_reviewer(make_agent, admin_user):
    agent = refund_agent(
        make_agent,
        {"amount": {"max": 500, "approve_above": 50, "approve_sum_above": 100}},
        refunds(50, 50, 50),
    )

    run = drive(submit_run(agent=agent, input="three refunds").pk)

    assert run.status == Run.Status.WAITING_APPROVAL
    assert calls(run) == [("succeeded", "50"), ("succeeded", "50"), ("awaiting_approval", "50")]
    approval = Approval.objects.get(run=run)
    assert approval.detail == (
        "amount 50 brings this run's total of issue_refund amount to 150, above 100, which needs "
        "a reviewer's approval"
    )
    decide(approval.pk, decision="approve", user=admin_user)
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED and refunded(run) == Decimal(150)


def test_a_held_call_reserves_its_amount_and_a_rejected_one_frees_it(make_agent, admin_user):
    agent = refund_agent(
        make_agent,
        {"amount": {"approve_sum_above": 100, "sum_max": 200}},
        refunds(50, 50, 50, 50, 50),  # 50, 100 allowed; 150, 200 held; 250 refused
        refunds(50, 50),  # after one rejection: 200 held, 250 refused
    )
    run = drive(submit_run(agent=agent, input="go").pk)
    assert calls(run) == [
        ("succeeded", "50"),
        ("succeeded", "50"),
        ("awaiting_approval", "50"),
        ("awaiting_approval", "50"),
        ("refused", "50"),
    ]
    first, second = Approval.objects.filter(run=run).order_by("step_index")
    decide(first.pk, decision="reject", user=admin_user, comment="too much")
    decide(second.pk, decision="approve", user=admin_user)

    run = drive(run.pk)
    assert run.status == Run.Status.WAITING_APPROVAL
    assert calls(run)[5:] == [("awaiting_approval", "50"), ("refused", "50")]
    decide(Approval.objects.get(run=run, status="pending").pk, decision="approve", user=admin_user)
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED and refunded(run) == Decimal(200)


def test_an_edit_that_would_pass_sum_max_is_refused(make_agent, admin_user):
    agent = refund_agent(
        make_agent, {"amount": {"approve_above": 10, "sum_max": 100}}, refunds(40, 40)
    )
    run = drive(submit_run(agent=agent, input="go").pk)
    first, second = Approval.objects.filter(run=run).order_by("step_index")

    arguments = {"order_id": "A-1", "amount": 70, "reason": "x"}
    with pytest.raises(DecisionError, match="to 110; the most allowed is 100") as refused:
        decide(first.pk, decision="edit", user=admin_user, arguments=arguments)
    assert refused.value.field == "arguments"
    assert Approval.objects.get(pk=first.pk).status == Approval.Status.PENDING

    decide(first.pk, decision="edit", user=admin_user, arguments={**arguments, "amount": 60})
    decide(second.pk, decision="approve", user=admin_user)
    assert refunded(drive(run.pk)) == Decimal(100)


def test_max_calls_per_session_counts_the_sessions_earlier_runs(make_agent):
    agent = refund_agent(
        make_agent,
        {"*": {"max_calls": 3, "per": "session"}},
        refunds(5, 5),
    )
    first = drive(submit_run(agent=agent, input="one", session="chat-1").pk)
    second = drive(submit_run(agent=agent, input="two", session="chat-1").pk)
    other = drive(submit_run(agent=agent, input="elsewhere", session="chat-2").pk)

    assert calls(first) == [("succeeded", "5"), ("succeeded", "5")]
    assert calls(second) == [("succeeded", "5"), ("refused", "5")]
    assert "issue_refund may be called at most 3 times per session" in (
        Step.objects.get(run=second, status="refused").error
    )
    assert calls(other) == [("succeeded", "5"), ("succeeded", "5")]


def test_sum_max_per_session_and_per_run_side_by_side(make_agent):
    agent = refund_agent(
        make_agent,
        {"amount": {"sum_max": 25, "per": "session"}, "*": {"max_calls": 1}},
        refunds(10, 10),
    )
    first = drive(submit_run(agent=agent, input="a", session="s").pk)
    second = drive(submit_run(agent=agent, input="b", session="s").pk)

    assert calls(first) == [("succeeded", "10"), ("refused", "10")]  # one call per run
    assert calls(second) == [("succeeded", "10"), ("refused", "10")]
    third = drive(submit_run(agent=agent, input="c", session="s").pk)
    assert calls(third) == [("refused", "10"), ("refused", "10")]  # 30 would pass 25
    assert "this session's total of issue_refund amount to 30" in (
        Step.objects.filter(run=third, kind="tool").order_by("index").first().error
    )


def test_an_amount_sent_as_a_string_counts_all_the_same(make_agent):
    agent = refund_agent(make_agent, {"amount": {"sum_max": 60}}, refunds("50", "50.00"))

    run = drive(submit_run(agent=agent, input="strings").pk)

    assert calls(run) == [("succeeded", "50"), ("refused", "50.00")]


@pytest.mark.django_db(transaction=True)
def test_two_reviewers_raising_two_held_refunds_at_once_cannot_both_pass(
    make_agent, admin_user, monkeypatch
):
    unpublished(monkeypatch)
    agent = refund_agent(
        make_agent, {"amount": {"approve_above": 10, "sum_max": 100}}, refunds(20, 20)
    )
    run = drive(submit_run(agent=agent, input="go").pk)
    approvals = list(Approval.objects.filter(run=run).order_by("step_index"))
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def raise_to_70(approval: Approval) -> None:
        try:
            barrier.wait()
            decide(
                approval.pk,
                decision="edit",
                user=admin_user,
                arguments={"order_id": "A-1", "amount": 70, "reason": "x"},
            )
            outcomes.append("approved")
        except DecisionError as exc:
            outcomes.append(str(exc))
        finally:
            close_old_connections()

    threads = [threading.Thread(target=raise_to_70, args=(a,)) for a in approvals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(outcomes)[0] == "approved" and "to 140; the most allowed is 100" in outcomes[1]
    held = Step.objects.filter(run=run, kind="tool")
    assert sum(Decimal(str(s.request["arguments"]["amount"])) for s in held) == 90


@pytest.mark.parametrize(
    ("constraints", "problem"),
    [
        ({"amount": {"sum_max": -1}}, "amount.sum_max: a number, 0 or more."),
        ({"amount": {"approve_sum_above": "lots"}}, "amount.approve_sum_above: a number"),
        ({"reason": {"sum_max": 10}}, "reason.sum_max: reason is not a number."),
        ({"amount": {"sum_max": 10, "per": "day"}}, "amount.per: run or session."),
        ({"amount": {"max": 10, "per": "run"}}, "amount.per: says where running totals"),
        ({"amount": {"max_calls": 3}}, 'max_calls goes under "*"'),
        ({"*": {"max_calls": -2}}, '"*".max_calls: a whole number, 0 or more.'),
        ({"*": {"max_calls": 2, "sum_max": 5}}, '"*".sum_max: unknown rule for the call itself'),
        ({"*": {}}, '"*": rules are a non-empty JSON object'),
    ],
)
def test_the_admin_names_what_is_wrong_with_cumulative_rules(constraints, problem):
    schema = registry.get("issue_refund").parameters_schema()
    assert any(problem in p for p in constraint_errors(constraints, schema)), constraint_errors(
        constraints, schema
    )


def test_cumulative_rules_validate(make_agent):
    schema = registry.get("issue_refund").parameters_schema()
    good = {
        "amount": {"max": 500, "approve_above": 50, "sum_max": 500, "approve_sum_above": 100},
        "*": {"max_calls": 10, "per": "session"},
    }
    assert constraint_errors(good, schema) == []


def grants_of_credits(make_agent: Any, constraints: dict[str, Any], *calls: dict[str, Any]) -> Any:
    return make_agent(
        grants={"grant_credits": {"mode": "allow", "constraints": constraints}},
        script=[
            {"tool_calls": [{"name": "grant_credits", "arguments": a} for a in calls]},
            {"text": "done"},
        ],
        max_steps=40,
    )


def executed(run: Run) -> list[str]:
    return [step.status for step in Step.objects.filter(run=run, kind="tool").order_by("index")]


def test_a_default_counts_in_the_total_as_the_tool_runs_it(make_agent):
    # The model leaves credits out: the tool grants its default of 100 each time.
    agent = grants_of_credits(make_agent, {"credits": {"sum_max": 200}}, *[{}] * 4)

    run = drive(submit_run(agent=agent, input="credits").pk)

    assert executed(run) == ["succeeded", "succeeded", "refused", "refused"]


def test_a_field_named_instead_of_its_alias_counts_all_the_same(make_agent):
    agent = grants_of_credits(
        make_agent,
        {"bonus": {"sum_max": 150}},
        {"bonus_eur": 100},
        {"bonus": 50},
        {"bonus_eur": 100},
    )

    run = drive(submit_run(agent=agent, input="bonus").pk)

    assert executed(run) == ["succeeded", "succeeded", "refused"]


def test_a_negative_amount_makes_no_room_under_sum_max(make_agent):
    agent = grants_of_credits(
        make_agent,
        {"credits": {"sum_max": 200}},
        {"credits": -1000},
        {"credits": 100},
        {"credits": 100},
        {"credits": 100},
    )

    run = drive(submit_run(agent=agent, input="refill").pk)

    assert executed(run) == ["succeeded", "succeeded", "succeeded", "refused"]


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_the_check_before_execution_takes_the_runs_lock(
    make_agent, monkeypatch
):
    # As on a worker: the tool call is executed outside any transaction, so the re-check takes
    # the run's lock itself (the engine's decision of the turn held it already).
    from django.db import connection

    unpublished(monkeypatch)

    agent = refund_agent(make_agent, {"amount": {"sum_max": 100}}, refunds(60, 60))
    seen: list[str] = []

    def statements(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    run = submit_run(agent=agent, input="go")
    engine.advance(run.pk)  # the model's turn: the first call pending, the second refused
    assert calls(run) == [("pending", "60"), ("refused", "60")]
    with connection.execute_wrapper(statements):
        execute_tool_call(run_id=run.pk, step_index=1)  # as a worker: outside a transaction

    assert calls(run)[0] == ("succeeded", "60")
    # The check's own lock (the claim and the record lock the run too, in their own ways).
    locks = [s for s in seen if s.startswith('SELECT %s AS "a" FROM "agents_run"')]
    assert len(locks) == 1 and locks[0].endswith("FOR UPDATE"), seen
