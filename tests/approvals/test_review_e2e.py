"""The acceptance test of the review queue, end to end over real processes: a run calls a tool
whose grant requires approval and pauses on a real Celery worker; a reviewer logs in to the admin
over HTTP (the ASGI server under uvicorn), opens the queue and the review page, and approves with
edited arguments; the run resumes on the worker, the tool runs exactly once with the edit, and the
audit trail tells the whole story in order."""

from __future__ import annotations

import re
from io import StringIO
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from agents.models import Run, Step
from agents.services import submit_run
from approvals.models import Approval
from audittrail.models import AuditEvent
from harness.polling import poll

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PASSWORD = "e2e-review-pass-5521"
CALC = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "{tool_results}"},
]
CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')

MODEL = "scripted:demo"  # the agent's route (the scripted provider follows CALC)
# The story, as agents/engine/ and approvals/services.py record it.
STORY = [
    ("run.submitted", None, "user", "carol"),
    ("run.started", None, "system", "engine"),
    ("step.succeeded", 0, "agent", MODEL),  # the model turn asking for calculator(6*7)
    ("tool_call.requested", 1, "agent", MODEL),
    ("approval.requested", 1, "system", "engine"),
    ("run.waiting_approval", None, "system", "engine"),
    ("approval.approved", 1, "user", "rita"),  # edited to 6*8, over HTTP in the admin
    ("run.resumed", None, "user", "rita"),
    ("tool_call.succeeded", 1, "system", "engine"),  # on the worker, once
    ("step.succeeded", 2, "agent", MODEL),  # the model turn reading 48
    ("run.succeeded", None, "system", "engine"),
]


def csrf_token(html: str) -> str:
    found = CSRF_INPUT.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def run_status(run_id: Any) -> str:
    return Run.objects.values_list("status", flat=True).get(pk=run_id)


def test_a_reviewer_edits_a_held_call_in_the_admin_and_the_worker_runs_it(
    celery_worker, api_server, make_agent, monkeypatch
):
    monkeypatch.setenv("E2E_REVIEWER_PASSWORD", PASSWORD)
    call_command(
        "create_reviewer", "rita", "--password-from-env", "E2E_REVIEWER_PASSWORD", stdout=StringIO()
    )
    carol = User.objects.create_user(username="carol")  # the client who submits the run
    agent = make_agent(
        slug="e2e-calc",
        model_route=MODEL,
        grants={"calculator": "require_approval"},
        script=CALC,
    )

    run = submit_run(agent=agent, input="6*7", owner=carol)
    poll(
        lambda: run_status(run.pk) == Run.Status.WAITING_APPROVAL,
        timeout=60,
        what=f"the run to wait for a reviewer (worker log:\n{celery_worker.log_tail()})",
    )
    approval = Approval.objects.get(run=run)
    assert approval.status == Approval.Status.PENDING
    assert approval.proposed_arguments == {"expression": "6*7"}
    assert Step.objects.get(run=run, index=1).status == Step.Status.AWAITING_APPROVAL
    review_page = f"/admin/approvals/approval/{approval.pk}/change/"

    with httpx.Client(base_url=api_server.base_url, timeout=20) as http:
        # Log in through the admin's own form (its CSRF token from the page and the cookie).
        login_page = http.get("/admin/login/", params={"next": "/admin/"})
        assert login_page.status_code == 200 and http.cookies.get("csrftoken")
        login = http.post(
            "/admin/login/?next=/admin/",
            data={
                "csrfmiddlewaretoken": csrf_token(login_page.text),
                "username": "rita",
                "password": PASSWORD,
                "next": "/admin/",
            },
        )
        assert login.status_code == 302, login.text[:2000]
        assert login.headers["location"] == "/admin/"

        queue = http.get("/admin/approvals/approval/")
        assert queue.status_code == 200
        assert review_page in queue.text and "e2e-calc" in queue.text

        page = http.get(review_page)
        assert page.status_code == 200
        assert '<pre class="approval-code" id="approval-input">6*7</pre>' in page.text
        assert "{\n  &quot;expression&quot;: &quot;6*7&quot;\n}" in page.text
        assert '<dd id="approval-submitted-by">carol</dd>' in page.text

        edit = {"decision": "edit", "arguments": '{\r\n  "expression": "6*8"\r\n}'}
        forged = http.post(review_page, data={**edit, "comment": "no token"})
        assert forged.status_code == 403  # CSRF protected: nothing decided
        assert Approval.objects.get(pk=approval.pk).status == Approval.Status.PENDING

        decided = http.post(
            review_page,
            data={**edit, "comment": "8, not 7", "csrfmiddlewaretoken": csrf_token(page.text)},
        )
        assert decided.status_code == 302, decided.text[:3000]
        assert decided.headers["location"] == "/admin/approvals/approval/"
        back = http.get(decided.headers["location"])
        assert "Approved calculator with your edited arguments; the run resumes." in back.text

    poll(
        lambda: Run.objects.get(pk=run.pk).is_final,
        timeout=60,
        what=f"the run to finish (worker log:\n{celery_worker.log_tail()})",
    )
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, (run.error, celery_worker.log_tail())
    assert "48" in run.result
    step = Step.objects.get(run=run, index=1)
    assert step.status == Step.Status.SUCCEEDED and step.attempts == 1
    assert step.response["result"] == 48
    assert step.request["arguments"] == {"expression": "6*8"}
    assert step.request["proposed_arguments"] == {"expression": "6*7"}
    approval.refresh_from_db()
    assert approval.status == Approval.Status.APPROVED and approval.consumed_at is not None
    assert approval.decided_by is not None and approval.decided_by.username == "rita"
    assert approval.approved_arguments == {"expression": "6*8"}
    assert approval.comment == "8, not 7"

    events = list(AuditEvent.objects.filter(run=run).order_by("id"))
    assert [(e.action, e.step_index, e.actor_type, e.actor) for e in events] == STORY
    approved = next(e for e in events if e.action == "approval.approved")
    assert approved.payload["edited"] is True
    assert approved.payload["arguments"] == {"expression": "6*8"}
    assert approved.payload["approval"] == str(approval.pk)
    assert approved.payload["comment"] == "8, not 7"
