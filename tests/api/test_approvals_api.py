"""The review queue over HTTP: reviewers list escalations and decide them; nobody else sees them.

Runs are submitted through the API by their owner (a client system, not a reviewer) and driven
in-process with ``tests.support.engine.drive`` until they wait for a reviewer; on_commit callbacks
never fire inside the test transaction, so a decision's resume is driven the same way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import requests
import schemathesis
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from rest_framework.test import APIClient

from agents.models import Run, Step
from approvals.models import Approval
from audittrail.models import AuditEvent
from tests.support.api import assert_error, nested
from tests.support.engine import drive

pytestmark = pytest.mark.django_db

APPROVALS = "/api/v1/approvals/"
APPROVAL_FIELDS = {
    "id",
    "status",
    "reason",
    "detail",
    "priority",
    "due_at",
    "overdue",
    "created_at",
    "run",
    "agent",
    "step_index",
    "tool",
    "edit_with",
    "proposed_arguments",
    "proposed_output",
    "context",
    "decided_by",
    "decided_at",
    "comment",
    "approved_arguments",
    "approved_output",
    "links",
}
CALC = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "{tool_results}"},
]


def approval_url(approval_id: Any, tail: str = "") -> str:
    return f"{APPROVALS}{approval_id}/{tail}"


def decide(client: Any, approval_id: Any, body: Any) -> Any:
    return client.post(approval_url(approval_id, "decision/"), body, format="json")


@pytest.fixture
def calc(make_agent: Callable[..., Any]) -> Any:
    return make_agent(slug="calc", grants={"calculator": {"mode": "require_approval"}}, script=CALC)


@pytest.fixture
def unsure(make_agent: Callable[..., Any]) -> Any:
    """An agent whose answer is below its confidence threshold: the answer is reviewed."""
    return make_agent(
        slug="unsure",
        escalation_policy={"min_confidence": 0.8},
        script=[{"text": '{"answer": "maybe 41", "confidence": 0.3}'}],
    )


def submit(client: Any, agent: str = "calc", input: Any = "6*7") -> str:
    response = client.post("/api/v1/runs/", {"agent": agent, "input": input}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["id"]


def held(client: Any, agent: str = "calc", input: Any = "6*7") -> tuple[str, Approval]:
    """Submit a run as ``client`` and drive it until it waits for a reviewer."""
    run_id = submit(client, agent, input)
    assert drive(run_id).status == Run.Status.WAITING_APPROVAL
    return run_id, Approval.objects.get(run_id=run_id, status=Approval.Status.PENDING)


def ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.content
    return [item["id"] for item in response.json()["results"]]


def approval_events(run_id: str) -> list[str]:
    return list(
        AuditEvent.objects.filter(run_id=run_id, action__startswith="approval.").values_list(
            "action", flat=True
        )
    )


# --- the queue -------------------------------------------------------------------------------


def test_a_reviewer_lists_pending_approvals_with_what_they_need_to_decide(
    reviewer_client, client_a, calc
):
    run_id, approval = held(client_a)
    decided_run, decided = held(client_a, input="1+1")
    assert decide(reviewer_client, decided.pk, {"decision": "approve"}).status_code == 200

    response = reviewer_client.get(APPROVALS)

    assert response.status_code == 200
    page = response.json()
    assert set(page) == {"count", "next", "previous", "results"}
    assert page["count"] == 1  # pending only, by default
    (item,) = page["results"]
    assert set(item) == APPROVAL_FIELDS
    assert item["id"] == str(approval.pk)
    assert item["status"] == "pending" and item["reason"] == "tool_requires_approval"
    assert item["detail"] == "the agent's grant of calculator requires approval"
    assert item["priority"] == "normal"
    assert item["due_at"] and item["overdue"] is False and item["created_at"]
    assert item["run"] == {
        "id": run_id,
        "status": "waiting_approval",
        "link": f"/api/v1/runs/{run_id}/",
    }
    assert item["agent"] == "calc" and item["step_index"] == 1 and item["tool"] == "calculator"
    assert item["edit_with"] == "arguments"
    assert item["proposed_arguments"] == {"expression": "6*7"}
    assert item["proposed_output"] is None
    context = item["context"]
    assert context["input"] == "6*7" and context["submitted_by"] == "alice-api"
    assert [(s["index"], s["kind"]) for s in context["steps"]] == [(0, "model"), (1, "tool")]
    assert context["steps"][1]["arguments"] == {"expression": "6*7"}
    assert context["steps"][1]["status"] == "awaiting_approval"
    assert item["decided_by"] is None and item["decided_at"] is None and item["comment"] == ""
    assert item["approved_arguments"] is None and item["approved_output"] is None
    assert item["links"] == {
        "self": f"/api/v1/approvals/{approval.pk}/",
        "decision": f"/api/v1/approvals/{approval.pk}/decision/",
    }


def test_an_answer_held_for_review_shows_the_proposed_output(reviewer_client, client_a, unsure):
    _, approval = held(client_a, "unsure", "q")

    (item,) = reviewer_client.get(APPROVALS).json()["results"]

    assert item["id"] == str(approval.pk) and item["reason"] == "low_confidence"
    assert item["tool"] == "" and item["edit_with"] == "output"
    assert item["proposed_arguments"] is None
    assert item["proposed_output"] == {"answer": "maybe 41", "confidence": 0.3}


def test_the_queue_is_most_urgent_first_then_soonest_due_then_oldest(
    reviewer_client, client_a, calc
):
    approvals = [held(client_a, input=f"{i}+1")[1] for i in range(5)]
    now = timezone.now()
    layout = [  # (priority, due in minutes); created in list order
        (Approval.Priority.NORMAL, 30),
        (Approval.Priority.URGENT, 90),
        (Approval.Priority.NORMAL, 10),
        (Approval.Priority.LOW, 1),
        (Approval.Priority.NORMAL, 10),
    ]
    for approval, (priority, minutes) in zip(approvals, layout, strict=True):
        Approval.objects.filter(pk=approval.pk).update(
            priority=priority, due_at=now + timedelta(minutes=minutes)
        )
    expected = [str(approvals[i].pk) for i in (1, 2, 4, 0, 3)]

    assert ids(reviewer_client.get(APPROVALS)) == expected
    first = reviewer_client.get(APPROVALS, {"limit": 2}).json()
    assert first["count"] == 5 and [a["id"] for a in first["results"]] == expected[:2]
    assert "offset=2" in first["next"]
    assert ids(reviewer_client.get(first["next"])) == expected[2:4]


def test_the_queue_filters(reviewer_client, client_a, calc, unsure):
    _, tool = held(client_a)
    _, answer = held(client_a, "unsure", "q")
    _, urgent = held(client_a, input="2+2")
    _, late = held(client_a, input="3+3")
    _, done = held(client_a, input="4+4")
    Approval.objects.filter(pk=urgent.pk).update(priority=Approval.Priority.URGENT)
    Approval.objects.filter(pk=late.pk).update(due_at=timezone.now() - timedelta(minutes=1))
    assert decide(reviewer_client, done.pk, {"decision": "approve"}).status_code == 200
    pending = {str(a.pk) for a in (tool, answer, urgent, late)}

    def listed(**filters: str) -> set[str]:
        return set(ids(reviewer_client.get(APPROVALS, filters)))

    assert listed() == pending == listed(status="pending")
    assert listed(status="approved") == {str(done.pk)}
    assert listed(status="all") == pending | {str(done.pk)}
    assert listed(status="rejected") == set()
    assert listed(agent="unsure") == {str(answer.pk)}
    assert listed(agent="calc") == pending - {str(answer.pk)}
    assert listed(agent="nobody") == set()
    assert listed(reason="low_confidence") == {str(answer.pk)}
    tool_calls = (pending - {str(answer.pk)}) | {str(done.pk)}
    assert listed(reason="tool_requires_approval", status="all") == tool_calls
    assert listed(priority="urgent") == {str(urgent.pk)}
    assert listed(priority="low") == set()
    assert listed(overdue="true") == {str(late.pk)}
    assert listed(overdue="false") == pending - {str(late.pk)}
    assert listed(overdue="true", status="approved") == set()
    assert listed(agent="calc", priority="normal", overdue="false") == {str(tool.pk)}
    (item,) = reviewer_client.get(APPROVALS, {"overdue": "true"}).json()["results"]
    assert item["overdue"] is True


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"status": "open"}, "status"),
        ({"status": ""}, "status"),
        ({"reason": "boredom"}, "reason"),
        ({"priority": "highest"}, "priority"),
        ({"priority": "2"}, "priority"),  # by name, not number
        ({"overdue": "maybe"}, "overdue"),
        ({"agent": "not a slug!"}, "agent"),
        ({"limit": "0"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"assignee": "me"}, "assignee"),
    ],
)
def test_an_invalid_filter_answers_400_naming_it(reviewer_client, client_a, calc, filters, field):
    held(client_a)

    error = assert_error(reviewer_client.get(APPROVALS, filters), 400, "invalid", field=field)

    assert error["message"].startswith(f"{field}: ")


def test_a_reviewer_reads_one_approval_whatever_its_status(reviewer_client, client_a, calc):
    _, approval = held(client_a)
    listed = reviewer_client.get(APPROVALS).json()["results"][0]

    response = reviewer_client.get(approval_url(approval.pk))

    assert response.status_code == 200 and response.json() == listed
    decide(reviewer_client, approval.pk, {"decision": "approve", "comment": "fine"})
    body = reviewer_client.get(approval_url(approval.pk)).json()
    assert body["status"] == "approved" and body["comment"] == "fine"


# A fixed unknown id: xdist requires every process to collect the same test ids.
@pytest.mark.parametrize(
    "approval_id",
    ["6f1c2a9e-3b4d-4e8f-9a7b-1c2d3e4f5a6b", "0123456789abcdef0123456789abcdef-", "-" * 36],
)
def test_an_unknown_approval_answers_404(reviewer_client, approval_id):
    assert_error(reviewer_client.get(approval_url(approval_id)), 404, "not_found")
    assert_error(decide(reviewer_client, approval_id, {"decision": "approve"}), 404, "not_found")


def test_a_non_uuid_path_is_not_an_approval(reviewer_client):
    assert_error(reviewer_client.get(approval_url("not-an-id")), 404, "not_found")


# --- who may see and decide ------------------------------------------------------------------


def test_a_caller_who_is_not_a_reviewer_gets_403_on_the_queue_and_404_on_an_approval(
    client_a, client_b, calc
):
    _, approval = held(client_a)

    for client in (client_a, client_b):  # the run's own owner is no reviewer either
        error = assert_error(client.get(APPROVALS), 403, "permission_denied")
        assert "reviewers" in error["message"]
        assert_error(client.get(APPROVALS, {"status": "nonsense"}), 403)  # nothing about filters
        assert_error(client.get(approval_url(approval.pk)), 404, "not_found")
        assert_error(decide(client, approval.pk, {"decision": "approve"}), 404, "not_found")
        malformed = client.post(
            approval_url(approval.pk, "decision/"), "{not json", content_type="application/json"
        )
        assert_error(malformed, 404, "not_found")

    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING and approval.decided_by is None
    assert approval_events(str(approval.run_id)) == ["approval.requested"]


def test_staff_without_the_permissions_are_not_reviewers(make_client, client_a, calc):
    _, approval = held(client_a)
    staff = make_client(username="sam", is_staff=True)

    assert_error(staff.get(APPROVALS), 403, "permission_denied")
    assert_error(staff.get(approval_url(approval.pk)), 404, "not_found")


def test_without_a_key_every_approvals_endpoint_answers_401(client_a, calc):
    _, approval = held(client_a)
    anonymous = APIClient()

    assert_error(anonymous.get(APPROVALS), 401, "not_authenticated")
    assert_error(anonymous.get(approval_url(approval.pk)), 401, "not_authenticated")
    assert_error(decide(anonymous, approval.pk, {"decision": "approve"}), 401, "not_authenticated")
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Bearer ask_0123456789ab_nope")
    assert_error(bad.get(APPROVALS), 401, "authentication_failed")
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING


def test_a_viewer_sees_the_queue_but_may_not_decide(make_client, client_a, calc):
    _, approval = held(client_a)
    user = User.objects.create_user(username="vera")
    user.user_permissions.add(Permission.objects.get(codename="view_approval"))
    viewer = make_client(user)

    assert ids(viewer.get(APPROVALS)) == [str(approval.pk)]
    assert viewer.get(approval_url(approval.pk)).status_code == 200
    error = assert_error(decide(viewer, approval.pk, {"decision": "approve"}), 403, "forbidden")
    assert "not allowed to decide" in error["message"]
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING


def test_a_reviewer_may_not_decide_on_a_run_they_submitted(reviewer_client, calc):
    _, approval = held(reviewer_client)  # submitted with the reviewer's own key

    error = assert_error(
        decide(reviewer_client, approval.pk, {"decision": "approve"}), 403, "forbidden"
    )

    assert "four-eyes" in error["message"]
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING and approval.decided_by is None
    assert (
        reviewer_client.get(approval_url(approval.pk)).status_code == 200
    )  # they may still see it


def test_self_approval_is_allowed_when_configured(reviewer_client, calc, settings):
    settings.AGENTSITE_ALLOW_SELF_APPROVAL = True
    run_id, approval = held(reviewer_client)

    response = decide(reviewer_client, approval.pk, {"decision": "approve"})

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "approved" and response.json()["decided_by"] == "rita"
    assert drive(run_id).status == Run.Status.SUCCEEDED


def test_another_reviewer_decides_the_reviewers_own_run(
    reviewer_client, make_reviewer_client, calc
):
    _, approval = held(reviewer_client)

    assert decide(make_reviewer_client(), approval.pk, {"decision": "approve"}).status_code == 200


# --- deciding --------------------------------------------------------------------------------


def test_approving_answers_the_decided_approval_and_the_run_goes_on(
    reviewer_client, client_a, calc
):
    run_id, approval = held(client_a)

    response = decide(
        reviewer_client, approval.pk, {"decision": "approve", "comment": "looks right"}
    )

    assert response.status_code == 200
    body = response.json()
    assert set(body) == APPROVAL_FIELDS and body["id"] == str(approval.pk)
    assert body["status"] == "approved" and body["decided_by"] == "rita"
    assert body["decided_at"] and body["comment"] == "looks right"
    assert body["approved_arguments"] == {"expression": "6*7"}
    assert body["approved_output"] is None
    assert approval_events(run_id) == ["approval.requested", "approval.approved"]

    run = drive(run_id)
    assert run.status == Run.Status.SUCCEEDED
    step = Step.objects.get(run_id=run_id, index=1)
    assert step.status == Step.Status.SUCCEEDED and step.response["result"] == 42
    owner_view = client_a.get(f"/api/v1/runs/{run_id}/").json()
    assert owner_view["status"] == "succeeded" and "42" in str(owner_view["result"])
    assert owner_view["pending_approval"] is None
    assert reviewer_client.get(approval_url(approval.pk)).json()["run"]["status"] == "succeeded"


def test_editing_runs_the_reviewers_arguments(reviewer_client, client_a, calc):
    run_id, approval = held(client_a)

    response = decide(
        reviewer_client, approval.pk, {"decision": "edit", "arguments": {"expression": "6*8"}}
    )

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "approved"
    assert response.json()["approved_arguments"] == {"expression": "6*8"}
    assert response.json()["proposed_arguments"] == {"expression": "6*7"}
    run = drive(run_id)
    step = Step.objects.get(run_id=run_id, index=1)
    assert run.status == Run.Status.SUCCEEDED
    assert step.request["arguments"] == {"expression": "6*8"} and step.response["result"] == 48


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"decision": "edit", "arguments": {"expr": "6*8"}}, "invalid_decision"),  # schema
        ({"decision": "edit", "arguments": {"expression": ["6*8"]}}, "invalid_decision"),
        ({"decision": "edit"}, "invalid_decision"),  # nothing to run
        ({"decision": "edit", "arguments": "6*8"}, "invalid"),  # not an object
        ({"decision": "edit", "arguments": ["6*8"]}, "invalid"),
        ({"decision": "approve", "arguments": {"expression": "1"}}, "invalid"),  # not an edit
    ],
)
def test_edit_with_invalid_arguments_answers_400_and_decides_nothing(
    reviewer_client, client_a, calc, body, code
):
    run_id, approval = held(client_a)

    error = assert_error(decide(reviewer_client, approval.pk, body), 400, code, field="arguments")

    assert set(error["fields"]) == {"arguments"}
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING and approval.decided_by is None
    assert Step.objects.get(run_id=run_id, index=1).status == Step.Status.AWAITING_APPROVAL
    assert approval_events(run_id) == ["approval.requested"]


def test_arguments_that_break_the_grant_are_refused_like_the_models(
    reviewer_client, client_a, make_agent
):
    make_agent(
        slug="narrow",
        grants={
            "calculator": {
                "mode": "require_approval",
                "constraints": {"expression": {"max_length": 5}},
            }
        },
        script=CALC,
    )
    _, approval = held(client_a, "narrow", "6*7")

    body = {"decision": "edit", "arguments": {"expression": "123456*2"}}
    error = assert_error(decide(reviewer_client, approval.pk, body), 400, "invalid_decision")

    assert "break the agent's grant" in error["fields"]["arguments"][0]
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING


@pytest.mark.parametrize("comment", [None, "", "   "])
def test_rejecting_without_a_comment_answers_400_naming_comment(
    reviewer_client, client_a, calc, comment
):
    run_id, approval = held(client_a)
    body = {"decision": "reject"} if comment is None else {"decision": "reject", "comment": comment}

    error = assert_error(
        decide(reviewer_client, approval.pk, body), 400, "invalid_decision", field="comment"
    )

    assert "comment" in error["message"]
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING
    assert approval_events(run_id) == ["approval.requested"]


def test_rejecting_with_a_comment_tells_the_model_and_the_tool_never_runs(
    reviewer_client, client_a, calc
):
    run_id, approval = held(client_a)

    response = decide(reviewer_client, approval.pk, {"decision": "reject", "comment": "not today"})

    assert response.status_code == 200
    assert response.json()["status"] == "rejected" and response.json()["comment"] == "not today"
    assert response.json()["approved_arguments"] is None
    run = drive(run_id)
    step = Step.objects.get(run_id=run_id, index=1)
    assert step.status == Step.Status.REFUSED and step.response is None
    assert run.status == Run.Status.SUCCEEDED
    assert "a human reviewer rejected this call: not today" in run.result


def test_a_second_decision_answers_409_and_changes_nothing(
    reviewer_client, make_reviewer_client, client_a, calc
):
    run_id, approval = held(client_a)
    assert (
        decide(reviewer_client, approval.pk, {"decision": "approve", "comment": "ok"}).status_code
        == 200
    )

    for client, body in [
        (reviewer_client, {"decision": "approve"}),
        (make_reviewer_client(), {"decision": "reject", "comment": "too late"}),
        (make_reviewer_client(), {"decision": "edit", "arguments": {"expression": "1+1"}}),
    ]:
        error = assert_error(decide(client, approval.pk, body), 409, "already_decided")
        assert "already approved by rita" in error["message"]

    approval.refresh_from_db()
    assert approval.status == Approval.Status.APPROVED and approval.comment == "ok"
    assert approval.approved_arguments == {"expression": "6*7"}
    assert approval_events(run_id) == ["approval.requested", "approval.approved"]


def test_an_approval_cancelled_with_its_run_cannot_be_decided(reviewer_client, client_a, calc):
    run_id, approval = held(client_a)
    assert client_a.post(f"/api/v1/runs/{run_id}/cancel/").status_code == 202

    assert_error(
        decide(reviewer_client, approval.pk, {"decision": "approve"}), 409, "already_decided"
    )
    assert reviewer_client.get(approval_url(approval.pk)).json()["status"] == "cancelled"
    assert ids(reviewer_client.get(APPROVALS)) == []
    assert ids(reviewer_client.get(APPROVALS, {"status": "cancelled"})) == [str(approval.pk)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "decision"),
        ({"decision": "maybe"}, "decision"),
        ({"decision": "APPROVE"}, "decision"),
        ({"decision": None}, "decision"),
        ({"decision": "approve", "status": "approved"}, "status"),
        ({"decision": "approve", "decided_by": "someone"}, "decided_by"),
        ({"decision": "edit", "output": "6*8"}, "output"),  # a tool call is edited by arguments
        ({"decision": "approve", "comment": ["x"]}, "comment"),
    ],
)
def test_an_invalid_decision_body_answers_400_naming_the_field(
    reviewer_client, client_a, calc, body, field
):
    run_id, approval = held(client_a)

    assert_error(decide(reviewer_client, approval.pk, body), 400, "invalid", field=field)

    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING
    assert approval_events(run_id) == ["approval.requested"]


@pytest.mark.parametrize("raw", ['{"decision": "approve"', "approve", "", "{'decision': 1}"])
def test_a_malformed_json_body_answers_400(reviewer_client, client_a, calc, raw):
    _, approval = held(client_a)

    response = reviewer_client.post(
        approval_url(approval.pk, "decision/"), raw, content_type="application/json"
    )

    if raw:
        assert_error(response, 400, "parse_error")
    else:  # no body at all: no decision
        assert_error(response, 400, "invalid", field="decision")
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (
            '{"decision": "edit", "arguments": ' + nested(400) + "}",
            "arguments",
            "Nested more than 64 levels deep",
        ),
        (
            '{"decision": "edit", "arguments": {"x": ' + nested(100_000, "", "array") + "}}",
            "arguments",
            "Nested more than 64 levels deep",
        ),
        (
            r'{"decision": "edit", "arguments": {"expression": "6*\ud800"}}',
            "arguments",
            "Surrogate characters are not allowed: U+D800.",
        ),
        (
            r'{"decision": "edit", "arguments": {"\udfff": "6*8"}}',
            "arguments",
            "Surrogate characters are not allowed: U+DFFF.",
        ),
        (
            r'{"decision": "reject", "comment": "no \ud800"}',
            "comment",
            "Surrogate characters are not allowed: U+D800.",
        ),
    ],
)
def test_a_decision_body_too_deep_or_with_a_lone_surrogate_answers_400(
    reviewer_client, client_a, calc, raw, field, words
):
    run_id, approval = held(client_a)

    response = reviewer_client.post(
        approval_url(approval.pk, "decision/"), raw, content_type="application/json"
    )

    error = assert_error(response, 400, "invalid", field=field)
    assert words in error["message"]
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING
    assert approval_events(run_id) == ["approval.requested"]


@pytest.mark.parametrize(
    "output",
    [
        '{"answer": ' + nested(70) + "}",
        r'{"answer": "fine\udc80"}',
        r'["\ud83d", "\ude00"]',
    ],
)
def test_an_edited_output_too_deep_or_with_a_lone_surrogate_answers_400(
    reviewer_client, client_a, unsure, output
):
    run_id, approval = held(client_a, "unsure", "q")

    response = reviewer_client.post(
        approval_url(approval.pk, "decision/"),
        '{"decision": "edit", "output": ' + output + "}",
        content_type="application/json",
    )

    error = assert_error(response, 400, "invalid", field="output")
    assert "64 levels" in error["message"] or "Surrogate characters" in error["message"]
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING
    assert approval_events(run_id) == ["approval.requested"]


@pytest.mark.parametrize("body", [["approve"], "approve", 1, None, True])
def test_a_json_body_that_is_not_an_object_answers_400(reviewer_client, client_a, calc, body):
    _, approval = held(client_a)

    response = reviewer_client.post(
        approval_url(approval.pk, "decision/"),
        json.dumps(body),
        content_type="application/json",
    )

    error = assert_error(response, 400, "invalid")
    assert "non_field_errors" in error["fields"] or "decision" in error["fields"]
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING


def test_an_unreadable_content_type_answers_415(reviewer_client, client_a, calc):
    _, approval = held(client_a)

    response = reviewer_client.post(
        approval_url(approval.pk, "decision/"), {"decision": "approve"}, format="multipart"
    )

    assert_error(response, 415, "unsupported_media_type")
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING


# --- answers held for review -----------------------------------------------------------------


def test_editing_a_held_answer_finishes_the_run_with_the_reviewers_output(
    reviewer_client, client_a, unsure
):
    run_id, approval = held(client_a, "unsure", "q")
    assert_error(
        decide(reviewer_client, approval.pk, {"decision": "edit", "arguments": {"a": 1}}),
        400,
        "invalid",
        field="arguments",
    )
    assert_error(
        decide(reviewer_client, approval.pk, {"decision": "edit"}),
        400,
        "invalid_decision",
        field="output",
    )

    response = decide(
        reviewer_client, approval.pk, {"decision": "edit", "output": {"answer": "42"}}
    )

    assert response.status_code == 200, response.content
    assert response.json()["approved_output"] == {"answer": "42"}
    run = Run.objects.get(pk=run_id)
    assert run.status == Run.Status.SUCCEEDED and run.result == {"answer": "42"}


def test_rejecting_a_held_answer_fails_the_run(reviewer_client, client_a, unsure):
    run_id, approval = held(client_a, "unsure", "q")

    response = decide(reviewer_client, approval.pk, {"decision": "reject", "comment": "wrong"})

    assert response.status_code == 200 and response.json()["status"] == "rejected"
    run = Run.objects.get(pk=run_id)
    assert run.status == Run.Status.FAILED and run.error_code == "rejected_by_reviewer"


# --- rate limit and schema -------------------------------------------------------------------


def test_the_request_rate_limit_covers_the_approvals_api(
    make_reviewer_client, client_a, calc, settings
):
    _, approval = held(client_a)
    settings.AGENTSITE_API_RATE_LIMIT = "2/minute"
    assert settings.REDIS_URL, "the rate limit counts in Redis: run with `make test`"
    reviewer_client = make_reviewer_client()

    assert reviewer_client.get(APPROVALS).status_code == 200
    assert reviewer_client.get(approval_url(approval.pk)).status_code == 200

    response = decide(reviewer_client, approval.pk, {"decision": "approve"})
    assert_error(response, 429, "throttled")
    assert int(response["Retry-After"]) >= 1
    approval.refresh_from_db()
    assert approval.status == Approval.Status.PENDING


SCHEMA = schemathesis.openapi.from_dict(
    json.loads(
        OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True))
    )
)


def conforms(method: str, path: str, response: Any) -> None:
    """The response (status, headers, body) conforms to the OpenAPI schema of the operation."""
    url = "http://testserver" + response.wsgi_request.get_full_path()
    headers: dict[str, list[str]] = {}
    for name, value in response.items():
        headers.setdefault(name.lower(), []).append(value)
    SCHEMA[path][method].validate_response(
        schemathesis.Response(
            status_code=response.status_code,
            headers=headers,
            content=response.content,
            request=requests.Request(method, url).prepare(),
            elapsed=0.0,
            verify=True,
        )
    )


@pytest.fixture
def documented() -> Callable[[str, str], set[int]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)

    def statuses(method: str, path: str) -> set[int]:
        return {int(code) for code in schema["paths"][path][method.lower()]["responses"]}

    return statuses


def test_the_schema_documents_every_status_the_approvals_api_answers(
    documented, reviewer_client, make_reviewer_client, client_a, calc, settings
):
    _, approval = held(client_a)
    _, own = held(reviewer_client)
    anonymous = APIClient()
    unknown = uuid.uuid4()
    item, decision = "/api/v1/approvals/{id}/", "/api/v1/approvals/{id}/decision/"
    answered = [
        ("GET", APPROVALS, reviewer_client.get(APPROVALS)),
        ("GET", APPROVALS, reviewer_client.get(APPROVALS, {"status": "x"})),
        ("GET", APPROVALS, anonymous.get(APPROVALS)),
        ("GET", APPROVALS, client_a.get(APPROVALS)),
        ("GET", item, reviewer_client.get(approval_url(approval.pk))),
        ("GET", item, anonymous.get(approval_url(approval.pk))),
        ("GET", item, client_a.get(approval_url(approval.pk))),
        ("GET", item, reviewer_client.get(approval_url(unknown))),
        ("POST", decision, decide(reviewer_client, approval.pk, {"decision": "x"})),
        (
            "POST",
            decision,
            reviewer_client.post(approval_url(approval.pk, "decision/"), {}, format="multipart"),
        ),
        (
            "POST",
            decision,
            reviewer_client.post(
                approval_url(approval.pk, "decision/"),
                '"' + "x" * settings.AGENTSITE_MAX_REQUEST_BYTES + '"',
                content_type="application/json",
            ),
        ),
        ("POST", decision, decide(anonymous, approval.pk, {"decision": "approve"})),
        ("POST", decision, decide(reviewer_client, own.pk, {"decision": "approve"})),
        ("POST", decision, decide(client_a, approval.pk, {"decision": "approve"})),
        ("POST", decision, decide(reviewer_client, approval.pk, {"decision": "approve"})),
        ("POST", decision, decide(reviewer_client, approval.pk, {"decision": "approve"})),
    ]
    settings.AGENTSITE_API_RATE_LIMIT = "1/minute"
    throttled = make_reviewer_client()
    throttled.get(APPROVALS)
    answered += [
        ("GET", APPROVALS, throttled.get(APPROVALS)),
        ("GET", item, throttled.get(approval_url(approval.pk))),
        ("POST", decision, decide(throttled, approval.pk, {"decision": "approve"})),
    ]

    statuses = {(method, path): set() for method, path, _ in answered}
    for method, path, response in answered:
        statuses[(method, path)].add(response.status_code)
    assert statuses == {
        ("GET", APPROVALS): {200, 400, 401, 403, 429},
        ("GET", item): {200, 401, 404, 429},
        ("POST", decision): {200, 400, 401, 403, 404, 409, 413, 415, 429},
    }
    for (method, path), codes in statuses.items():
        assert codes <= documented(method, path), (method, path, codes)
    for method, path, response in answered:  # and each body is what the schema says
        conforms(method, path, response)
    assert documented("POST", decision) == {200, 400, 401, 403, 404, 409, 413, 415, 429}


def test_the_schema_documents_the_queue_filters_and_the_decision_body(documented):
    schema = SchemaGenerator().get_schema(request=None, public=True)
    listing = schema["paths"][APPROVALS]["get"]
    query = {p["name"] for p in listing["parameters"] if p["in"] == "query"}
    assert query >= {"status", "agent", "reason", "priority", "overdue", "limit", "offset"}
    request = schema["components"]["schemas"]["DecisionRequest"]
    assert set(request["properties"]) == {"decision", "arguments", "output", "comment"}
    assert request["required"] == ["decision"]
    assert set(schema["components"]["schemas"]["Approval"]["properties"]) == APPROVAL_FIELDS


def test_options_follows_the_same_rules(reviewer_client, client_a, calc):
    _, approval = held(client_a)

    assert reviewer_client.options(APPROVALS).status_code == 200
    assert reviewer_client.options(approval_url(approval.pk)).status_code == 200
    assert_error(client_a.options(APPROVALS), 403, "permission_denied")
    assert_error(client_a.options(approval_url(approval.pk)), 404, "not_found")
    assert_error(client_a.options(approval_url(approval.pk, "decision/")), 404, "not_found")
