"""The management commands: seed_demo is idempotent; run_agent validates before it queues."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from agents.models import Agent, AgentVersion, Run
from audittrail.models import AuditEvent
from tools.models import KnowledgeDocument

pytestmark = pytest.mark.django_db


def run_command(*args: str, **options: object) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO(), **options)
    return out.getvalue()


def test_seed_demo_is_idempotent():
    first = run_command("seed_demo")
    assert "seeded 5 articles, 3 agents" in first
    articles = dict(KnowledgeDocument.objects.values_list("title", "body"))
    assert len(articles) == 5 and "Refund policy" in articles

    second = run_command("seed_demo")
    assert "support-assistant: support-assistant v1" in second
    assert "math-tutor: math-tutor v1" in second

    assert set(Agent.objects.values_list("slug", flat=True)) == {
        "support-assistant",
        "math-tutor",
        "refund-agent",
    }
    for slug, tools in [
        ("support-assistant", ["calculator", "knowledge_search"]),
        ("math-tutor", ["calculator"]),
        ("refund-agent", ["escalate_to_human", "issue_refund"]),
    ]:
        agent = Agent.objects.get(slug=slug)
        assert agent.current_version.number == 1, slug
        assert agent.current_version.tools == tools
        assert AgentVersion.objects.filter(agent=agent).count() == 1, slug
    assert KnowledgeDocument.objects.count() == 5
    assert dict(KnowledgeDocument.objects.values_list("title", "body")) == articles
    assert AuditEvent.objects.filter(action="agent.version_published").count() == 3


def test_seed_demo_restores_a_drifted_demo_agent_without_a_new_version():
    run_command("seed_demo")
    Agent.objects.filter(slug="math-tutor").update(max_steps=99)
    run_command("seed_demo")
    agent = Agent.objects.get(slug="math-tutor")
    assert agent.max_steps == 6
    # The stored configuration went back to the seeded one, equal to version 1's snapshot.
    assert agent.current_version.number == 1


def test_run_agent_with_an_unknown_agent_names_the_known_ones(make_agent):
    make_agent(slug="alpha", script=[{"text": "hi"}])
    make_agent(slug="beta", script=[{"text": "hi"}])
    with pytest.raises(CommandError) as excinfo:
        run_command("run_agent", "nope", "hello")
    message = str(excinfo.value)
    assert "'nope'" in message and "alpha" in message and "beta" in message
    assert not Run.objects.exists()


def test_run_agent_with_no_agents_at_all_suggests_seed_demo():
    with pytest.raises(CommandError, match="seed_demo"):
        run_command("run_agent", "nope", "hello")


def test_run_agent_json_with_invalid_json_is_rejected(make_agent):
    make_agent(slug="alpha", script=[{"text": "hi"}])
    with pytest.raises(CommandError, match="JSON"):
        run_command("run_agent", "alpha", "{not json", json=True)
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"q": ' + "[" * 5000 + "]" * 5000 + "}",
            "--json given but the input is refused: "
            "Nested more than 64 levels deep (arrays and objects).",
        ),
        (
            '{"q": "\\ud800"}',
            "--json given but the input is refused: Surrogate characters are not allowed: U+D800.",
        ),
    ],
    ids=["deep", "surrogate"],
)
def test_run_agent_json_too_deep_or_with_a_lone_surrogate_is_rejected(make_agent, text, message):
    make_agent(slug="alpha", script=[{"text": "hi"}])
    with pytest.raises(CommandError) as refused:
        run_command("run_agent", "alpha", text, json=True)
    assert str(refused.value) == message
    assert not Run.objects.exists()


def test_run_agent_refuses_text_with_a_lone_surrogate(make_agent):
    # Linux hands a program bytes that are not UTF-8 as lone surrogates (surrogateescape).
    make_agent(slug="alpha", script=[{"text": "hi"}])
    with pytest.raises(CommandError, match=r"input must not contain surrogate characters"):
        run_command("run_agent", "alpha", b"caf\xe9".decode("utf-8", "surrogateescape"))
    assert not Run.objects.exists()


def test_run_agent_json_queues_the_parsed_object(make_agent):
    make_agent(slug="alpha", script=[{"text": "hi"}])
    run_command("run_agent", "alpha", '{"question": "why?"}', json=True)
    assert Run.objects.get().input == {"question": "why?"}


def test_run_agent_with_an_invalid_model_route_is_rejected(make_agent):
    make_agent(slug="alpha", script=[{"text": "hi"}])
    with pytest.raises(CommandError) as excinfo:
        run_command("run_agent", "alpha", "hello", model="no route")
    assert "invalid model route" in str(excinfo.value)
    assert "'no route'" in str(excinfo.value)
    assert not Run.objects.exists()


def test_run_agent_with_empty_input_is_rejected(make_agent):
    make_agent(slug="alpha", script=[{"text": "hi"}])
    with pytest.raises(CommandError, match="must not be empty"):
        run_command("run_agent", "alpha", "   ")


def test_run_agent_without_wait_queues_a_run(make_agent):
    agent = make_agent(slug="alpha", script=[{"text": "hi"}])
    out = run_command("run_agent", "alpha", "hello", model="other:model-x")

    run = Run.objects.get()
    assert run.status == Run.Status.QUEUED
    assert run.agent == agent and run.agent_version == agent.current_version
    assert run.input == "hello" and run.model_route == "other:model-x"
    assert out.strip() == f"run {run.pk} queued (alpha v1, other:model-x)"
    assert AuditEvent.objects.get(run=run).actor == "cli"


def test_run_agent_uses_the_versions_route_by_default():
    run_command("seed_demo")
    out = run_command("run_agent", "math-tutor", "1+2")
    run = Run.objects.get()
    assert "queued" in out and run.status == Run.Status.QUEUED
    assert run.model_route == "scripted:demo"


def test_the_seeded_refund_agent_waits_for_a_reviewer_above_50_eur(admin_user):
    from agents.models import Run
    from agents.services import submit_run
    from approvals.models import Approval
    from approvals.services import decide
    from tests.support.engine import drive
    from tools.models import OutboxMessage

    run_command("seed_demo")
    run = drive(submit_run(agent="refund-agent", input="parcel never arrived").pk)

    assert run.status == Run.Status.WAITING_APPROVAL
    approval = Approval.objects.get(run=run)
    assert approval.tool_name == "issue_refund" and approval.reason == "tool_requires_approval"
    assert approval.detail == "amount is 120, above 50, which needs a reviewer's approval"
    assert not OutboxMessage.objects.exists()

    decide(
        approval.pk,
        decision="edit",
        user=admin_user,
        arguments={"order_id": "A-1001", "amount": 45, "reason": "parcel never arrived"},
    )
    run = drive(run.pk)
    assert run.status == Run.Status.SUCCEEDED
    (refund,) = OutboxMessage.objects.filter(run=run)
    assert refund.kind == "refund" and refund.payload["amount"] == "45"
