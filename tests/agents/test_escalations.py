"""Escalations other than a tool's grant: the model asks, low confidence, an answer that fails
the output schema after a repair turn, an exhausted budget; decisions on them; expiry."""

from __future__ import annotations

import json
from datetime import timedelta
from functools import reduce

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from agents import engine
from agents.models import Run, Step
from agents.services import submit_run
from approvals.models import Approval
from approvals.services import DecisionError, NotAllowedToDecide, decide, expire_overdue
from audittrail.models import AuditEvent
from tests.support.engine import drive


def held(run: Run) -> Approval:
    run.refresh_from_db()
    assert run.status == Run.Status.WAITING_APPROVAL
    return Approval.objects.get(run=run, status=Approval.Status.PENDING)


def actions(run: Run) -> list[str]:
    return list(AuditEvent.objects.filter(run=run).values_list("action", flat=True))


# --- the model asks for a human --------------------------------------------------------------

ASK = [
    {"tool_calls": [{"name": "escalate_to_human", "arguments": {"reason": "angry customer"}}]},
    {"text": "Human said: {last_tool_result}"},
]


@pytest.mark.parametrize("mode", ["allow", "require_approval"])
def test_escalate_to_human_always_waits_and_the_reply_is_its_result(make_agent, reviewer, mode):
    agent = make_agent(grants={"escalate_to_human": mode}, script=ASK)
    run = drive(submit_run(agent=agent, input="I want my money").pk)

    approval = held(run)
    assert approval.reason == "model_requested" and approval.detail == "angry customer"
    assert approval.context["input"] == "I want my money"
    decide(approval.pk, decision="edit", user=reviewer, output="Offer a voucher", comment="ok")

    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED
    reply = json.loads(run.result.removeprefix("Human said: "))
    assert reply == {"reviewer_decision": "approved", "comment": "ok", "answer": "Offer a voucher"}


def test_a_rejected_request_for_help_is_told_to_the_model(make_agent, reviewer):
    agent = make_agent(grants=["escalate_to_human"], script=ASK)
    run = drive(submit_run(agent=agent, input="help").pk)
    decide(held(run).pk, decision="reject", user=reviewer, comment="handle it yourself")

    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED
    assert '"reviewer_decision": "rejected"' in run.result and "handle it yourself" in run.result


# --- low confidence --------------------------------------------------------------------------


def confident(make_agent, answer: str):
    return make_agent(escalation_policy={"min_confidence": 0.8}, script=[{"text": answer}])


def test_a_confident_answer_finishes_the_run(make_agent):
    agent = confident(make_agent, '{"answer": "42", "confidence": 0.95}')
    run = drive(submit_run(agent=agent, input="q").pk)
    assert run.status == Run.Status.SUCCEEDED
    assert run.result == {"answer": "42", "confidence": 0.95}


def test_a_low_confidence_answer_waits_for_a_reviewer(make_agent, reviewer):
    agent = confident(make_agent, '{"answer": "maybe 41", "confidence": 0.3}')
    run = drive(submit_run(agent=agent, input="q").pk)

    approval = held(run)
    assert approval.reason == "low_confidence"
    assert approval.detail == "the model's confidence 0.3 is below the agent's threshold 0.8"
    assert approval.proposed_output == {"answer": "maybe 41", "confidence": 0.3}
    decide(approval.pk, decision="edit", user=reviewer, output={"answer": "42"})

    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.result == {"answer": "42"}
    assert actions(run)[-2:] == ["approval.approved", "run.succeeded"]


def test_an_answer_without_a_confidence_counts_as_low_and_rejecting_fails_the_run(
    make_agent, reviewer
):
    agent = confident(make_agent, "just text")
    run = drive(submit_run(agent=agent, input="q").pk)
    approval = held(run)
    assert approval.detail == "the model gave no confidence"

    decide(approval.pk, decision="reject", user=reviewer, comment="wrong")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.error_code == "rejected_by_reviewer"
    assert "wrong" in run.error


def test_the_model_is_told_how_to_report_its_confidence(make_agent):
    agent = confident(make_agent, "x")
    run = submit_run(agent=agent, input="q")
    system = engine.build_messages(run, [])[0]
    assert system["role"] == "system" and '"confidence"' in system["content"]


# --- output schema ---------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"total": {"type": "number"}},
    "required": ["total"],
    "additionalProperties": False,
}


def test_an_invalid_answer_gets_one_repair_turn(make_agent):
    agent = make_agent(
        output_schema=SCHEMA, script=[{"text": "not json"}, {"text": '{"total": 3}'}]
    )
    run = drive(submit_run(agent=agent, input="sum").pk)

    assert run.status == Run.Status.SUCCEEDED and run.result == {"total": 3}
    first, second = Step.objects.filter(run=run, kind="model").order_by("index")
    assert first.response["output_errors"] == "the answer is not JSON"
    assert "output.invalid" in actions(run)
    messages = engine.build_messages(run, [first])
    assert messages[-1]["name"] == "agentsite"
    assert (
        "does not match the required output schema: the answer is not JSON"
        in (messages[-1]["content"])
    )
    assert json.dumps(SCHEMA, sort_keys=True) in messages[0]["content"]


def test_an_answer_still_invalid_after_repair_goes_to_a_reviewer(make_agent, reviewer):
    agent = make_agent(
        output_schema=SCHEMA, script=[{"text": "nope"}, {"text": '{"total": "three"}'}]
    )
    run = drive(submit_run(agent=agent, input="sum").pk)

    approval = held(run)
    assert approval.reason == "output_invalid"
    assert "total: 'three' is not of type 'number'" in approval.detail
    with pytest.raises(DecisionError) as as_is:
        decide(approval.pk, decision="approve", user=reviewer)
    assert as_is.value.field == "output"
    with pytest.raises(DecisionError, match="Additional properties"):
        decide(approval.pk, decision="edit", user=reviewer, output={"total": 3, "x": 1})
    assert held(run).status == Approval.Status.PENDING

    decide(approval.pk, decision="edit", user=reviewer, output='{"total": 3}')
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.result == {"total": 3}


# --- budget ----------------------------------------------------------------------------------

LOOP = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]},
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}]},
    {"text": "done: {tool_results}"},
]


def budget_agent(make_agent, **policy):
    return make_agent(
        tools=["calculator"],
        max_steps=3,
        escalation_policy={"on_budget_exhausted": "escalate", **policy},
        script=LOOP,
    )


def test_an_exhausted_budget_escalates_and_approval_grants_another(make_agent, reviewer):
    run = drive(submit_run(agent=budget_agent(make_agent), input="go").pk)

    approval = held(run)
    assert approval.reason == "budget_exhausted"
    assert "would pass the run's limit of 3 steps" in approval.detail
    decide(approval.pk, decision="approve", user=reviewer, comment="one more go")

    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED, run.error
    kinds = list(run.steps.order_by("index").values_list("kind", "status"))
    assert kinds == [
        ("model", "succeeded"),
        ("tool", "succeeded"),
        ("model", "succeeded"),
        ("tool", "succeeded"),
        ("model", "succeeded"),
    ]


def test_rejecting_more_budget_fails_the_run_and_without_the_policy_it_just_fails(
    make_agent, reviewer
):
    run = drive(submit_run(agent=budget_agent(make_agent), input="go").pk)
    decide(held(run).pk, decision="reject", user=reviewer, comment="enough")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"

    plain = make_agent(tools=["calculator"], max_steps=3, script=LOOP)
    run = drive(submit_run(agent=plain, input="go").pk)
    assert run.status == Run.Status.FAILED and run.error_code == "budget_exceeded"
    assert not Approval.objects.filter(run=run).exists()


# --- who may decide, and expiry --------------------------------------------------------------


def test_only_reviewers_decide_and_never_on_their_own_runs(make_agent, reviewer, settings):
    agent = make_agent(grants=["escalate_to_human"], script=ASK)
    outsider = User.objects.create_user(username="olga", is_staff=True)
    run = drive(submit_run(agent=agent, input="help", owner=reviewer).pk)
    approval = held(run)

    with pytest.raises(NotAllowedToDecide, match="reviewers only"):
        decide(approval.pk, decision="approve", user=outsider)
    with pytest.raises(NotAllowedToDecide, match="four-eyes"):
        decide(approval.pk, decision="approve", user=reviewer)
    assert held(run).status == Approval.Status.PENDING

    settings.AGENTSITE_ALLOW_SELF_APPROVAL = True
    decide(approval.pk, decision="approve", user=reviewer)
    assert Approval.objects.get(pk=approval.pk).status == Approval.Status.APPROVED


def test_overdue_approvals_are_rejected_as_expired_by_default(make_agent):
    agent = make_agent(grants=["escalate_to_human"], script=ASK)
    run = drive(submit_run(agent=agent, input="help").pk)
    approval = held(run)
    Approval.objects.filter(pk=approval.pk).update(due_at=timezone.now() - timedelta(minutes=1))

    assert expire_overdue() == 1

    approval.refresh_from_db()
    assert approval.status == Approval.Status.EXPIRED
    event = AuditEvent.objects.get(run=run, action="approval.expired")
    assert event.actor == "review-sla" and "expired" in event.payload["comment"]
    assert not AuditEvent.objects.filter(run=run, action="approval.rejected").exists()
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED and '"reviewer_decision": "expired"' in run.result
    assert expire_overdue() == 0


def test_overdue_approvals_can_be_escalated_instead(make_agent):
    agent = make_agent(
        grants=["escalate_to_human"],
        escalation_policy={"on_expiry": "escalate", "review_sla_minutes": 30},
        script=ASK,
    )
    run = drive(submit_run(agent=agent, input="help").pk)
    approval = held(run)
    assert approval.priority == Approval.Priority.NORMAL
    Approval.objects.filter(pk=approval.pk).update(due_at=timezone.now() - timedelta(minutes=1))

    assert expire_overdue() == 1
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING
    assert approval.priority == Approval.Priority.HIGH
    assert approval.due_at > timezone.now() + timedelta(minutes=29)
    assert AuditEvent.objects.filter(run=run, action="approval.escalated").count() == 1


def test_an_expired_answer_fails_the_run_as_expired_not_rejected(make_agent):
    agent = confident(make_agent, "no idea")
    run = drive(submit_run(agent=agent, input="q").pk)
    Approval.objects.filter(run=run).update(due_at=timezone.now() - timedelta(minutes=1))

    assert expire_overdue() == 1
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.error_code == "review_expired"


@pytest.mark.parametrize(
    "answer",
    [
        '{"answer": "x", "confidence": NaN}',
        '{"answer": "x", "confidence": 1.5}',
        '{"answer": "x", "confidence": true}',
    ],
)
def test_a_confidence_that_is_not_a_real_0_to_1_figure_counts_as_none(make_agent, answer):
    run = drive(submit_run(agent=confident(make_agent, answer), input="q").pk)
    assert held(run).detail == "the model gave no confidence"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("output", {"answer": float("nan")}, "output must not contain NaN or Infinity"),
        ("output", {"answer": "a\x00b"}, "output must not contain NUL characters"),
        ("comment", "ok\x00", "comment must not contain NUL characters"),
        (
            "output",
            {"answer": "\ud800"},
            "output must not contain surrogate characters (U+D800)",
        ),
        ("comment", "ok\udcff", "comment must not contain surrogate characters (U+DCFF)"),
        (
            "output",
            {"answer": reduce(lambda inner, _: {"a": inner}, range(5000), {})},
            "output must not nest more than 64 levels deep (arrays and objects)",
        ),
    ],
    ids=["nan", "nul", "nul-comment", "surrogate", "surrogate-comment", "deep"],
)
def test_a_reviewers_input_that_cannot_be_stored_is_a_decision_error(
    make_agent, reviewer, field, value, message
):
    run = drive(submit_run(agent=confident(make_agent, "no idea"), input="q").pk)
    approval = held(run)
    kwargs = {"output": {"answer": "fine"}, "comment": "ok", field: value}
    with pytest.raises(DecisionError) as info:
        decide(approval.pk, decision="edit", user=reviewer, **kwargs)
    assert str(info.value) == message and info.value.field == field
    assert held(run).status == Approval.Status.PENDING


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"min_confidence": "0.8"}, "min_confidence is a number from 0 to 1"),
        ({"on_budget_exhausted": "Escalate"}, "on_budget_exhausted is one of fail, escalate"),
        ({"review_sla_minutes": 1e12}, "review_sla_minutes is a number of minutes"),
        ({"min_confidense": 0.5}, "Unknown keys: min_confidense"),
        ({"priorities": {"low_confidence": "asap"}}, "priorities maps a reason"),
    ],
)
def test_a_mistyped_escalation_policy_is_refused_when_saving(make_agent, policy, message):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        make_agent(escalation_policy=policy)
    assert message in str(info.value.message_dict["escalation_policy"])


@pytest.mark.django_db(transaction=True)
def test_two_reviewers_deciding_at_the_same_moment_get_one_success_and_one_already_decided(
    make_agent,
):
    import threading

    from django.db import connection

    from approvals.services import AlreadyDecided

    group = Group.objects.get(name="reviewers")
    reviewers = []
    for name in ("ann", "bob"):
        user = User.objects.create_user(username=name, is_staff=True)
        user.groups.add(group)
        reviewers.append(User.objects.get(pk=user.pk))
    agent = make_agent(grants=["escalate_to_human"], script=ASK)
    run = drive(submit_run(agent=agent, input="help").pk)
    approval = held(run)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def decide_as(user: User, decision: str) -> None:
        try:
            barrier.wait(timeout=10)
            decide(approval.pk, decision=decision, user=user, comment=f"by {user.username}")
            outcomes.append(f"{user.username}: decided")
        except AlreadyDecided as exc:
            outcomes.append(f"{user.username}: {exc}")
        finally:
            connection.close()

    threads = [
        threading.Thread(target=decide_as, args=(reviewers[0], "approve")),
        threading.Thread(target=decide_as, args=(reviewers[1], "reject")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(outcomes) == 2, outcomes
    assert sum(o.endswith(": decided") for o in outcomes) == 1, outcomes
    (loser,) = [o for o in outcomes if not o.endswith(": decided")]
    assert "already" in loser
    approval.refresh_from_db()
    assert approval.status in (Approval.Status.APPROVED, Approval.Status.REJECTED)
    decided_events = AuditEvent.objects.filter(
        run=run, action__in=("approval.approved", "approval.rejected")
    )
    assert decided_events.count() == 1
