"""The review queue in the admin, as a reviewer (a staff user in the ``reviewers`` group) uses it:
the list and its filters, the review page, decisions posted as the browser posts them, the
four-eyes rule, permissions, bulk actions, and ``manage.py create_reviewer``.

Escalations are raised the way the engine raises them (a scripted model's call of a tool whose
grant requires approval), and runs are driven in-process after a decision."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.utils import timezone

from agents.models import Agent, Run, Step
from agents.services import submit_run
from approvals.models import Approval
from approvals.services import decide
from audittrail.models import AuditEvent
from tests.agents.test_admin import form_data, messages_of
from tests.support.engine import drive
from tests.support.users import REVIEWER_PASSWORD, make_reviewer

pytestmark = pytest.mark.django_db

QUEUE = "/admin/approvals/approval/"
CALC = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "{tool_results}"},
]
ASK = [
    {"tool_calls": [{"name": "escalate_to_human", "arguments": {"reason": "angry customer"}}]},
    {"text": "Human said: {last_tool_result}"},
]
SCHEMA = {
    "type": "object",
    "properties": {"total": {"type": "number"}},
    "required": ["total"],
    "additionalProperties": False,
}


@pytest.fixture
def rclient(client: Any, reviewer: User) -> Any:
    """The test client, logged in as the reviewer (with the password, as a person would)."""
    assert client.login(username="rita", password=REVIEWER_PASSWORD)
    return client


@pytest.fixture
def carol(db: None) -> User:
    """A client system's user: the one who submits the runs."""
    return User.objects.create_user(username="carol")


def calc_agent(make_agent: Any, slug: str | None = None, **fields: Any) -> Agent:
    grant = {"mode": "require_approval", **fields.pop("grant", {})}
    return make_agent(slug=slug, grants={"calculator": grant}, script=CALC, **fields)


def hold(agent: Agent, *, input: Any = "6*7", owner: User | None = None) -> Approval:
    """Submit a run and drive it until a reviewer must decide; its pending approval."""
    run = drive(submit_run(agent=agent, input=input, owner=owner).pk)
    assert run.status == Run.Status.WAITING_APPROVAL
    return Approval.objects.get(run=run, status=Approval.Status.PENDING)


def page(approval: Approval) -> str:
    return f"{QUEUE}{approval.pk}/change/"


def listed(response: Any) -> list[Approval]:
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def tool_step(run_id: Any) -> Step:
    return Step.objects.get(run_id=run_id, index=1)


def approval_actions(approval: Approval) -> list[str]:
    return list(
        AuditEvent.objects.filter(run_id=approval.run_id, action__startswith="approval.")
        .order_by("id")
        .values_list("action", flat=True)
    )


# --- the queue -------------------------------------------------------------------------------


def test_the_queue_lists_pending_escalations_most_urgent_then_soonest_due(
    make_agent, rclient, carol
):
    support = calc_agent(make_agent, "support")
    payments = calc_agent(make_agent, "payments", escalation_policy={"priority": "urgent"})
    later = hold(support, input="1+1", owner=carol)
    urgent = hold(payments, input="2+2", owner=carol)
    sooner = hold(support, input="3+3", owner=carol)
    Approval.objects.filter(pk=sooner.pk).update(due_at=timezone.now() + timedelta(minutes=5))
    decided = hold(support, input="4+4", owner=carol)
    decide(decided.pk, decision="approve", user=make_reviewer("bob"))
    overdue = hold(support, input="5+5", owner=carol)
    Approval.objects.filter(pk=overdue.pk).update(due_at=timezone.now() - timedelta(minutes=1))

    response = rclient.get(QUEUE)
    # Urgent first; then, at the same priority, the soonest due (the overdue one is due first).
    assert listed(response) == [urgent, overdue, sooner, later]
    html = response.content.decode()
    assert "<title>Review queue" in html
    assert html.count("OVERDUE") == 1 and "Tool requires approval" in html
    assert "payments" in html and "urgent" in html and "calculator" in html
    assert str(decided.run_id)[:8] not in html  # decided: not in the queue
    # Reviewers may not see runs: the run column is its id, not a link to a 403.
    assert f"/admin/agents/run/{urgent.run_id}/" not in html and str(urgent.run_id)[:8] in html

    everything = listed(rclient.get(f"{QUEUE}?status=all"))
    assert decided in everything and len(everything) == 5
    assert listed(rclient.get(f"{QUEUE}?status=approved")) == [decided]


def test_the_queue_filters_by_agent_reason_priority_and_overdue(make_agent, rclient):
    support = calc_agent(make_agent, "support")
    payments = calc_agent(make_agent, "payments", escalation_policy={"priority": "high"})
    unsure = make_agent(
        slug="unsure",
        escalation_policy={"min_confidence": 0.8},
        script=[{"text": '{"answer": "maybe 41", "confidence": 0.3}'}],
    )
    call = hold(support)
    pay = hold(payments)
    low = Approval.objects.get(run=drive(submit_run(agent=unsure, input="q").pk))
    assert low.reason == "low_confidence"
    Approval.objects.filter(pk=call.pk).update(due_at=timezone.now() - timedelta(hours=1))

    assert listed(rclient.get(f"{QUEUE}?agent=payments")) == [pay]
    assert listed(rclient.get(f"{QUEUE}?agent=unsure")) == [low]
    assert listed(rclient.get(f"{QUEUE}?reason__exact=low_confidence")) == [low]
    assert set(listed(rclient.get(f"{QUEUE}?reason__exact=tool_requires_approval"))) == {
        call,
        pay,
    }
    assert listed(rclient.get(f"{QUEUE}?priority__exact=2")) == [pay]
    assert listed(rclient.get(f"{QUEUE}?overdue=yes")) == [call]
    assert set(listed(rclient.get(f"{QUEUE}?overdue=no"))) == {pay, low}
    # A decided escalation past its due time is not overdue.
    decide(call.pk, decision="approve", user=make_reviewer("bob"))
    assert listed(rclient.get(f"{QUEUE}?overdue=yes&status=all")) == []
    # The filters are offered on the page.
    html = rclient.get(QUEUE).content.decode()
    for choice in ("?agent=payments", "?reason__exact=low_confidence", "?overdue=yes"):
        assert choice in html


# --- the review page -------------------------------------------------------------------------


def test_the_review_page_shows_the_context_readably(make_agent, rclient, carol):
    agent = calc_agent(make_agent, "calc-desk")
    approval = hold(agent, input="6*7", owner=carol)

    response = rclient.get(page(approval))
    assert response.status_code == 200
    html = response.content.decode()
    assert response.context["input_text"] == "6*7"
    assert '<pre class="approval-code" id="approval-input">6*7</pre>' in html
    # The proposed call: the tool and its arguments pretty-printed, not a one-line dump.
    assert response.context["proposed_arguments"] == '{\n  "expression": "6*7"\n}'
    assert '<code id="approval-tool">calculator</code>' in html
    assert (
        '<pre class="approval-code" id="approval-arguments">'
        "{\n  &quot;expression&quot;: &quot;6*7&quot;\n}</pre>" in html
    )
    assert "Tool requires approval" in html
    assert "the agent&#x27;s grant of calculator requires approval" in html
    assert '<dd id="approval-submitted-by">carol</dd>' in html
    assert "calc-desk v1" in html
    assert "OVERDUE" not in html and "(in 3" in html  # due in 4 hours (the default SLA)
    # The last steps, as a table: the model turn and the held call.
    steps = response.context["steps"]
    assert [(s["index"], s["kind"], s["status"], s["tool"]) for s in steps] == [
        (0, "model", "succeeded", ""),
        (1, "tool", "awaiting_approval", "calculator"),
    ]
    assert steps[1]["arguments"] == '{\n  "expression": "6*7"\n}' and steps[1]["is_subject"]
    assert html.count('<tr class="row') == 2 and "approval-subject" in html
    # The decision form, prefilled with the proposal to edit.
    data = form_data(response)
    assert json.loads(data["arguments"]) == {"expression": "6*7"}
    assert data["comment"] == ""
    for label in ("Approve", "Edit, then approve", "Reject"):
        assert f">{label}</button>" in html


def test_a_json_input_is_shown_indented(make_agent, rclient):
    approval = hold(calc_agent(make_agent), input={"order": 7, "note": "rush"})
    response = rclient.get(page(approval))
    assert response.context["input_is_json"] is True
    assert json.loads(response.context["input_text"]) == {"order": 7, "note": "rush"}
    assert "\n  &quot;note&quot;: &quot;rush&quot;" in response.content.decode()


def test_approving_on_the_page_runs_the_proposed_call(make_agent, rclient, reviewer):
    approval = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(approval)))

    response = rclient.post(page(approval), {**data, "decision": "approve", "comment": "fine"})
    assert response.status_code == 302 and response.url == QUEUE
    assert messages_of(response) == ["Approved calculator; the run resumes."]
    approval.refresh_from_db()
    assert approval.status == "approved" and approval.decided_by == reviewer
    assert approval.comment == "fine" and approval.approved_arguments == {"expression": "6*7"}
    run = drive(approval.run_id)
    step = tool_step(run.pk)
    assert run.status == Run.Status.SUCCEEDED and step.response["result"] == 42
    assert step.attempts == 1
    event = AuditEvent.objects.get(run=run, action="approval.approved")
    assert (event.actor_type, event.actor) == ("user", "rita")
    assert event.payload["edited"] is False and event.payload["comment"] == "fine"


def test_edit_then_approve_on_the_page_runs_the_edited_arguments(make_agent, rclient):
    approval = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(approval)))
    # As a browser posts a textarea: CRLF line ends.
    edited = '{\r\n  "expression": "6*8"\r\n}'

    response = rclient.post(page(approval), {**data, "decision": "edit", "arguments": edited})
    assert response.status_code == 302
    assert messages_of(response) == [
        "Approved calculator with your edited arguments; the run resumes."
    ]
    run = drive(approval.run_id)
    step = tool_step(run.pk)
    assert run.status == Run.Status.SUCCEEDED and step.response["result"] == 48
    assert step.request["arguments"] == {"expression": "6*8"}
    assert step.request["proposed_arguments"] == {"expression": "6*7"}
    assert AuditEvent.objects.get(run=run, action="approval.approved").payload["edited"] is True
    # The decided page shows the decision and no form.
    html = rclient.get(page(approval)).content.decode()
    assert 'id="approval_form"' not in html
    assert "<strong>Approved</strong> (edited)" in html
    assert '<dd id="approval-decided-by">rita</dd>' in html
    assert "&quot;expression&quot;: &quot;6*8&quot;" in html


def test_rejecting_needs_a_comment_and_then_the_model_is_told(make_agent, rclient):
    approval = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(approval)))

    response = rclient.post(page(approval), {**data, "decision": "reject", "comment": "  "})
    assert response.status_code == 200
    assert response.context["form"].errors["comment"] == ["a rejection needs a comment saying why"]
    assert "a rejection needs a comment saying why" in response.content.decode()
    approval.refresh_from_db()
    assert approval.status == "pending" and approval_actions(approval) == ["approval.requested"]

    response = rclient.post(page(approval), {**data, "decision": "reject", "comment": "not today"})
    assert response.status_code == 302
    assert messages_of(response) == ["Rejected calculator; the agent is told why."]
    run = drive(approval.run_id)
    step = tool_step(run.pk)
    assert step.status == Step.Status.REFUSED and step.attempts == 0
    assert run.status == Run.Status.SUCCEEDED
    assert "a human reviewer rejected this call: not today" in run.result
    html = rclient.get(page(approval)).content.decode()
    assert (
        '<dd id="approval-comment">not today</dd>' in html and "<strong>Rejected</strong>" in html
    )


def test_invalid_json_in_an_edit_is_a_form_error_and_decides_nothing(make_agent, rclient):
    approval = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(approval)))

    response = rclient.post(
        page(approval), {**data, "decision": "edit", "arguments": '{"expression": "6*8"'}
    )
    assert response.status_code == 200
    errors = response.context["form"].errors["arguments"]
    assert len(errors) == 1 and errors[0].startswith("Not valid JSON: ")
    html = response.content.decode()
    assert "Not valid JSON" in html and 'id="approval_form"' in html
    # The reviewer's text is kept in the form to correct.
    assert "{&quot;expression&quot;: &quot;6*8&quot;</textarea>" in html
    approval.refresh_from_db()
    assert approval.status == "pending" and approval_actions(approval) == ["approval.requested"]
    assert tool_step(approval.run_id).status == Step.Status.AWAITING_APPROVAL


@pytest.mark.parametrize(
    ("decision", "text", "message"),
    [
        (
            "edit",
            '{"expression": ' + "[" * 50_000 + "]" * 50_000 + "}",
            "Nested more than 64 levels deep (arrays and objects).",
        ),
        (
            "edit",
            '{"expression": "6*\\ud800"}',
            "Surrogate characters are not allowed: U+D800.",
        ),
        (
            "approve",
            '{"expression": ' + "[" * 50_000 + "]" * 50_000 + "}",
            "You changed this: press “Edit, then approve” to use your version, or put the "
            "proposal back to approve it as it is.",
        ),
    ],
    ids=["edit-deep", "edit-surrogate", "approve-deep"],
)
def test_json_too_deep_or_with_a_lone_surrogate_is_a_form_error_and_decides_nothing(
    make_agent, rclient, decision, text, message
):
    approval = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(approval)))

    response = rclient.post(page(approval), {**data, "decision": decision, "arguments": text})

    assert response.status_code == 200
    assert response.context["form"].errors["arguments"] == [message]
    approval.refresh_from_db()
    assert approval.status == "pending" and approval_actions(approval) == ["approval.requested"]


def test_edited_arguments_that_fail_the_schema_or_the_grant_show_why(make_agent, rclient):
    agent = calc_agent(make_agent, grant={"constraints": {"expression": {"max_length": 5}}})
    approval = hold(agent)
    data = form_data(rclient.get(page(approval)))

    response = rclient.post(page(approval), {**data, "decision": "edit", "arguments": '{"x": 1}'})
    assert response.status_code == 200
    (error,) = response.context["form"].errors["arguments"]
    assert "Field required" in error and "expression" in error
    response = rclient.post(
        page(approval), {**data, "decision": "edit", "arguments": '{"expression": "123456"}'}
    )
    (error,) = response.context["form"].errors["arguments"]
    assert "break the agent's grant" in error and "the most allowed is 5" in error
    response = rclient.post(page(approval), {**data, "decision": "edit", "arguments": "[1, 2]"})
    assert response.context["form"].errors["arguments"] == [
        "edit needs the arguments to run, as a JSON object"
    ]
    approval.refresh_from_db()
    assert approval.status == "pending" and approval_actions(approval) == ["approval.requested"]


def test_approve_with_changed_arguments_is_refused_rather_than_dropping_the_edit(
    make_agent, rclient
):
    approval = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(approval)))

    # Reformatted but the same arguments: approving as proposed is fine...
    same = rclient.post(
        page(approval), {**data, "decision": "approve", "arguments": '{"expression":"6*7"}'}
    )
    assert same.status_code == 302
    other = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(other)))
    # ...changed ones need "Edit, then approve".
    response = rclient.post(
        page(other), {**data, "decision": "approve", "arguments": '{"expression": "6*8"}'}
    )
    assert response.status_code == 200
    (error,) = response.context["form"].errors["arguments"]
    assert "press “Edit, then approve” to use your version" in error
    other.refresh_from_db()
    assert other.status == "pending"


def test_deciding_an_already_decided_escalation_says_so(make_agent, rclient):
    approval = hold(calc_agent(make_agent))
    data = form_data(rclient.get(page(approval)))  # rita opens the page...
    decide(approval.pk, decision="approve", user=make_reviewer("bob"), comment="mine")  # bob wins

    response = rclient.post(page(approval), {**data, "decision": "reject", "comment": "no"})
    assert response.status_code == 302 and response.url == QUEUE
    assert messages_of(response) == [
        "Already decided: this escalation was already approved by bob. "
        "Your decision was not applied."
    ]
    approval.refresh_from_db()
    assert approval.status == "approved" and approval.decided_by.username == "bob"
    html = rclient.get(page(approval)).content.decode()
    assert '<dd id="approval-decided-by">bob</dd>' in html
    assert '<dd id="approval-comment">mine</dd>' in html and 'id="approval_form"' not in html


def test_a_reviewer_cannot_decide_a_run_they_submitted(make_agent, rclient, reviewer, settings):
    settings.AGENTSITE_ALLOW_SELF_APPROVAL = False
    approval = hold(calc_agent(make_agent), owner=reviewer)

    response = rclient.get(page(approval))
    html = response.content.decode()
    assert response.status_code == 200 and 'id="approval_form"' not in html
    assert "another reviewer must decide (four-eyes rule)" in html

    response = rclient.post(page(approval), {"decision": "approve", "comment": ""})
    assert response.status_code == 403
    assert "you submitted this run: another reviewer must decide" in response.content.decode()
    approval.refresh_from_db()
    assert approval.status == "pending" and approval_actions(approval) == ["approval.requested"]

    settings.AGENTSITE_ALLOW_SELF_APPROVAL = True
    assert 'id="approval_form"' in rclient.get(page(approval)).content.decode()
    response = rclient.post(page(approval), {"decision": "approve", "comment": "mine, allowed"})
    assert response.status_code == 302
    approval.refresh_from_db()
    assert approval.status == "approved" and approval.decided_by == reviewer


# --- answers and requests for help -----------------------------------------------------------


def test_a_low_confidence_answer_is_shown_and_can_be_edited(make_agent, rclient):
    agent = make_agent(
        escalation_policy={"min_confidence": 0.8},
        script=[{"text": '{"answer": "maybe 41", "confidence": 0.3}'}],
    )
    run = drive(submit_run(agent=agent, input="what is 6*7?").pk)
    approval = Approval.objects.get(run=run)

    response = rclient.get(page(approval))
    html = response.content.decode()
    assert "Low confidence" in html and "below the agent&#x27;s threshold 0.8" in html
    assert '<pre class="approval-code" id="approval-output">{\n  &quot;answer' in html
    assert ">Approve the answer</button>" in html
    data = form_data(response)
    assert json.loads(data["output"]) == {"answer": "maybe 41", "confidence": 0.3}

    response = rclient.post(
        page(approval), {**data, "decision": "edit", "output": '{"answer": "42"}'}
    )
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.result == {"answer": "42"}


def test_a_plain_text_answer_is_edited_as_plain_text_without_a_schema(make_agent, rclient):
    agent = make_agent(escalation_policy={"min_confidence": 0.8}, script=[{"text": "just text"}])
    run = drive(submit_run(agent=agent, input="q").pk)
    approval = Approval.objects.get(run=run)
    data = form_data(rclient.get(page(approval)))
    assert data["output"] == "just text"

    response = rclient.post(
        page(approval), {**data, "decision": "edit", "output": "The answer is 42.\r\nThanks."}
    )
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.result == "The answer is 42.\nThanks."


def test_an_answer_failing_the_output_schema_must_be_edited_to_valid_json(make_agent, rclient):
    agent = make_agent(
        output_schema=SCHEMA, script=[{"text": "nope"}, {"text": '{"total": "three"}'}]
    )
    run = drive(submit_run(agent=agent, input="sum").pk)
    approval = Approval.objects.get(run=run)
    assert approval.reason == "output_invalid"
    data = form_data(rclient.get(page(approval)))

    response = rclient.post(page(approval), {**data, "decision": "approve"})
    (error,) = response.context["form"].errors["output"]
    assert "does not match the output schema" in error
    response = rclient.post(page(approval), {**data, "decision": "edit", "output": "three"})
    assert response.context["form"].errors["output"][0].startswith("Not valid JSON")
    response = rclient.post(
        page(approval), {**data, "decision": "edit", "output": '{"total": 3, "x": 1}'}
    )
    assert "Additional properties" in response.context["form"].errors["output"][0]
    approval.refresh_from_db()
    assert approval.status == "pending"

    response = rclient.post(page(approval), {**data, "decision": "edit", "output": '{"total": 3}'})
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.result == {"total": 3}


def test_a_request_for_help_is_answered_on_the_page(make_agent, rclient):
    agent = make_agent(grants=["escalate_to_human"], script=ASK)
    run = drive(submit_run(agent=agent, input="I want my money").pk)
    approval = Approval.objects.get(run=run)
    response = rclient.get(page(approval))
    html = response.content.decode()
    assert "The model asked for a human" in html and "angry customer" in html
    assert ">Reply with this answer</button>" in html
    data = form_data(response)
    assert data["output"] == ""

    response = rclient.post(page(approval), {**data, "decision": "edit", "output": ""})
    assert response.context["form"].errors["output"] == ["Enter the answer to use."]
    response = rclient.post(
        page(approval), {**data, "decision": "edit", "output": "Offer a voucher", "comment": "ok"}
    )
    assert response.status_code == 302
    assert messages_of(response) == ["Answered the agent; the run resumes."]
    run = drive(run.pk)
    reply = json.loads(run.result.removeprefix("Human said: "))
    assert reply == {"reviewer_decision": "approved", "comment": "ok", "answer": "Offer a voucher"}


# --- permissions -----------------------------------------------------------------------------


def test_staff_without_the_reviewers_group_cannot_see_the_queue(make_agent, client):
    approval = hold(calc_agent(make_agent))
    User.objects.create_user(username="sam", password=REVIEWER_PASSWORD, is_staff=True)
    assert client.login(username="sam", password=REVIEWER_PASSWORD)

    assert client.get(QUEUE).status_code == 403
    assert client.get(page(approval)).status_code == 403
    assert client.post(page(approval), {"decision": "approve"}).status_code == 403
    assert "/admin/approvals/" not in client.get("/admin/").content.decode()
    approval.refresh_from_db()
    assert approval.status == "pending"


def test_reviewers_see_the_queue_and_nothing_else(rclient):
    index = rclient.get("/admin/")
    html = index.content.decode()
    assert index.status_code == 200
    assert f'href="{QUEUE}"' in html and "Review queue" in html
    assert "/admin/agents/" not in html and "/admin/tools/" not in html
    for url in (
        "/admin/agents/agent/",
        "/admin/agents/agent/add/",
        "/admin/agents/run/",
        "/admin/tools/tool/",
        "/admin/auth/user/",
    ):
        assert rclient.get(url).status_code == 403, url


def test_viewing_without_the_decide_permission_shows_the_page_but_no_decision(make_agent, client):
    approval = hold(calc_agent(make_agent))
    viewer = User.objects.create_user(username="vic", password=REVIEWER_PASSWORD, is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_approval"))
    assert client.login(username="vic", password=REVIEWER_PASSWORD)

    queue = client.get(QUEUE)
    assert listed(queue) == [approval]
    assert "bulk_approve" not in queue.content.decode()  # no actions without the permission
    response = client.get(page(approval))
    html = response.content.decode()
    assert response.status_code == 200 and 'id="approval_form"' not in html
    assert "not allowed to decide escalations (reviewers only)" in html
    response = client.post(page(approval), {"decision": "approve"})
    assert response.status_code == 403
    approval.refresh_from_db()
    assert approval.status == "pending"


def test_approvals_are_never_added_changed_or_deleted_as_rows(make_agent, admin_client):
    approval = hold(calc_agent(make_agent))
    assert admin_client.get(f"{QUEUE}add/").status_code == 403
    assert admin_client.get(f"{QUEUE}{approval.pk}/delete/").status_code == 403
    assert admin_client.post(f"{QUEUE}{approval.pk}/delete/", {"post": "yes"}).status_code == 403
    queue = admin_client.get(QUEUE).content.decode()
    assert "delete_selected" not in queue and f"{QUEUE}add/" not in queue
    # The page's form is the decision, not the model: no field of the row can be posted.
    response = admin_client.post(
        page(approval), {"decision": "approve", "status": "rejected", "priority": "0"}
    )
    assert response.status_code == 302
    approval.refresh_from_db()
    assert approval.status == "approved" and approval.priority == Approval.Priority.NORMAL
    # A superuser sees the run as a link.
    assert (
        f"/admin/agents/run/{approval.run_id}/change/"
        in admin_client.get(page(approval)).content.decode()
    )


# --- bulk actions ----------------------------------------------------------------------------


def test_bulk_approve_decides_each_and_reports(make_agent, rclient, reviewer, carol):
    agent = calc_agent(make_agent)
    first = hold(agent, input="1+1", owner=carol)
    second = hold(agent, input="2+2", owner=carol)
    taken = hold(agent, input="3+3", owner=carol)
    own = hold(agent, input="4+4", owner=reviewer)  # four-eyes: not rita's to decide
    queue = rclient.get(QUEUE)
    assert "bulk_approve" in queue.content.decode()
    decide(taken.pk, decision="reject", user=make_reviewer("bob"), comment="no")  # meanwhile

    response = rclient.post(
        QUEUE,
        {
            "action": "bulk_approve",
            "index": "0",
            "_selected_action": [str(a.pk) for a in (first, second, taken, own)],
        },
    )
    assert response.status_code == 302
    assert messages_of(response) == ["2 approved, 1 already decided, 1 not allowed."]
    statuses = dict(Approval.objects.values_list("pk", "status"))
    assert [statuses[a.pk] for a in (first, second, taken, own)] == [
        "approved",
        "approved",
        "rejected",
        "pending",
    ]
    assert [tool_step(drive(a.run_id).pk).response["result"] for a in (first, second)] == [2, 4]
    assert listed(rclient.get(QUEUE)) == [own]


def test_bulk_reject_asks_for_a_comment_on_a_confirmation_page(make_agent, rclient, carol):
    agent = calc_agent(make_agent)
    first = hold(agent, input="1+1", owner=carol)
    second = hold(agent, input="2+2", owner=carol)
    kept = hold(agent, input="3+3", owner=carol)
    selected = {"action": "bulk_reject", "index": "0", "_selected_action": [first.pk, second.pk]}

    confirm = rclient.post(QUEUE, selected)
    assert confirm.status_code == 200
    html = confirm.content.decode()
    assert "Reject these 2 escalations?" in html and html.count("<li>Tool requires") == 2
    data = form_data(confirm)
    assert data["post"] == "yes" and data["action"] == "bulk_reject"
    assert sorted(data["_selected_action"]) == sorted([str(first.pk), str(second.pk)])
    assert Approval.objects.filter(status="pending").count() == 3  # nothing decided yet

    again = rclient.post(QUEUE, {**data, "comment": " "})
    assert again.status_code == 200
    assert "A rejection needs a comment saying why." in again.content.decode()
    assert Approval.objects.filter(status="pending").count() == 3

    done = rclient.post(QUEUE, {**data, "comment": "duplicates"})
    assert done.status_code == 302
    assert messages_of(done) == ["2 rejected, 0 already decided, 0 not allowed."]
    for approval in (first, second):
        approval.refresh_from_db()
        assert (approval.status, approval.comment) == ("rejected", "duplicates")
        run = drive(approval.run_id)
        assert "a human reviewer rejected this call: duplicates" in run.result
    kept.refresh_from_db()
    assert kept.status == "pending"


# --- manage.py create_reviewer ---------------------------------------------------------------


def test_create_reviewer_without_a_password_says_how_to_set_one(db, client):
    out = StringIO()
    call_command("create_reviewer", "rhea", "--email", "rhea@example.com", stdout=out)

    user = User.objects.get(username="rhea")
    assert user.is_staff and not user.is_superuser and not user.has_usable_password()
    assert user.email == "rhea@example.com"
    assert list(user.groups.values_list("name", flat=True)) == ["reviewers"]
    assert user.has_perm("approvals.decide_approval") and not user.has_perm("agents.view_agent")
    text = out.getvalue()
    assert "Created reviewer 'rhea'" in text
    assert "python manage.py changepassword rhea" in text


def test_create_reviewer_with_a_password_from_the_environment(db, client, monkeypatch):
    monkeypatch.setenv("REVIEWER_PW", "a-long-enough-pass-7731")
    User.objects.create_user(username="rex", email="old@example.com")  # an existing user
    out = StringIO()
    call_command("create_reviewer", "rex", "--password-from-env", "REVIEWER_PW", stdout=out)
    call_command("create_reviewer", "rex", "--password-from-env", "REVIEWER_PW", stdout=out)

    assert "Updated reviewer 'rex'" in out.getvalue()
    assert "changepassword" not in out.getvalue()
    user = User.objects.get(username="rex")
    assert user.is_staff and user.email == "old@example.com" and user.groups.count() == 1
    assert client.login(username="rex", password="a-long-enough-pass-7731")
    assert client.get(QUEUE).status_code == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad name!"], "invalid username 'bad name!'"),
        (["ok", "--email", "not-an-email"], "invalid --email 'not-an-email'"),
        (["ok", "--password-from-env", "NO_SUCH_VAR_X"], "NO_SUCH_VAR_X is not set or is empty"),
        (["ok", "--password-from-env", "SHORT_PW"], "the password in SHORT_PW is refused"),
    ],
)
def test_create_reviewer_refuses_bad_input_clearly(db, monkeypatch, args, message):
    monkeypatch.setenv("SHORT_PW", "1")
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        call_command("create_reviewer", *args, stdout=StringIO())
    assert not User.objects.filter(username__in=["ok", "bad name!"]).exists()
