"""The Django admin as a superuser sees it: changelists, read-only runs, versioned agent edits,
the cancel action and write-only provider keys. Forms are posted as a browser would post them."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib.messages import get_messages

from agents.models import Agent, AgentVersion, ModelProvider, Run, Step
from agents.providers import resolve_route
from agents.services import start_session, submit_run
from audittrail.models import AuditEvent
from tests.support.engine import drive
from tools.models import KnowledgeDocument, OutboxMessage, Tool

pytestmark = pytest.mark.django_db

SCRIPT = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "Result: {last_tool_result}"},
]


class _FormFields(HTMLParser):
    """Collect what a browser would submit from the page's form (no submit buttons)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[tuple[str, str]] = []
        self._in_form = False
        self._textarea: str | None = None
        self._text: list[str] = []
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "form" and a.get("method", "").lower() == "post" and "id" in a:
            self._in_form = a["id"] != "logout-form"
        if not self._in_form or "name" not in a and tag != "option":
            return
        if tag == "input":
            kind = a.get("type", "text")
            if kind in ("submit", "button", "image", "reset", "file"):
                return
            if kind in ("checkbox", "radio"):
                if "checked" in a:
                    self.fields.append((a["name"], a.get("value") or "on"))
                return
            self.fields.append((a["name"], a.get("value", "")))
        elif tag == "textarea":
            self._textarea, self._text = a["name"], []
        elif tag == "select":
            self._select = a["name"]
        elif tag == "option" and self._select and "selected" in a:
            self.fields.append((self._select, a.get("value", "")))

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea" and self._textarea is not None:
            text = "".join(self._text)
            self.fields.append((self._textarea, text[1:] if text.startswith("\n") else text))
            self._textarea = None
        elif tag == "select":
            self._select = None
        elif tag == "form":
            self._in_form = False


def form_data(response: Any) -> dict[str, Any]:
    """The admin form on ``response`` as POST data; repeated names (checkboxes) become lists."""
    assert response.status_code == 200
    parser = _FormFields()
    parser.feed(response.content.decode())
    data: dict[str, Any] = {}
    for name, value in parser.fields:
        if name in data:
            data[name] = (
                [*data[name], value] if isinstance(data[name], list) else [data[name], value]
            )
        else:
            data[name] = value
    assert "csrfmiddlewaretoken" in data, "the admin form was not found on the page"
    data.pop("csrfmiddlewaretoken")
    return data


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def test_changelists_answer_200_and_show_their_rows(admin_client, make_agent):
    agent = make_agent(slug="calc-agent", tools=["calculator"], script=SCRIPT)
    session = start_session(agent=agent)
    run = drive(submit_run(agent=agent, input="6*7", session=session).pk)
    assert run.status == Run.Status.SUCCEEDED
    ModelProvider.objects.create(name="localprov", base_url="http://127.0.0.1:9/v1")
    KnowledgeDocument.objects.create(title="Refund policy", body="Five days.", tags="refund")
    OutboxMessage.objects.create(
        idempotency_key="k", tool="send_email", kind="email", destination="someone@example.com"
    )

    expectations = {
        "/admin/agents/agent/": ("calc-agent", Agent.objects.count()),
        "/admin/agents/agentversion/": ("calc-agent", AgentVersion.objects.count()),
        "/admin/agents/run/": (str(run.pk), Run.objects.count()),
        "/admin/agents/step/": ("calculator", Step.objects.filter(run=run).count()),
        "/admin/agents/session/": (str(session.pk), 1),
        "/admin/audittrail/auditevent/": ("run.succeeded", AuditEvent.objects.count()),
        "/admin/agents/modelprovider/": ("localprov", 1),
        "/admin/tools/knowledgedocument/": ("Refund policy", 1),
        "/admin/tools/tool/": ("knowledge_search", Tool.objects.count()),
        "/admin/tools/outboxmessage/": ("someone@example.com", 1),
    }
    for url, (text, count) in expectations.items():
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert response.context["cl"].result_count == count >= 1, url
        assert text in response.content.decode(), url


def test_run_change_page_shows_steps_inline(admin_client, make_agent):
    agent = make_agent(tools=["calculator"], script=SCRIPT)
    run = drive(submit_run(agent=agent, input="6*7").pk)

    response = admin_client.get(f"/admin/agents/run/{run.pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="steps-group"' in html
    assert 'name="steps-TOTAL_FORMS" value="3"' in html
    for step in run.steps.all():
        assert f"/admin/agents/step/{step.pk}/change/" in html
    # Every field of the run is shown read-only: no input for status, result or tokens.
    data = form_data(response)
    assert not {"status", "result", "input_tokens", "error"} & set(data)


def test_posting_a_change_to_a_run_does_not_alter_it(admin_client, make_agent):
    agent = make_agent(tools=["calculator"], script=SCRIPT)
    run = drive(submit_run(agent=agent, input="6*7").pk)
    before = Run.objects.values().get(pk=run.pk)
    steps_before = list(Step.objects.filter(run=run).values().order_by("index"))
    url = f"/admin/agents/run/{run.pk}/change/"
    data = form_data(admin_client.get(url))
    data.update(
        status="failed",
        result='"forged"',
        error="forged",
        error_code="x",
        input_tokens="999",
        cancel_requested="on",
        model_route="other:model",
        _save="Save",
    )
    data["steps-0-status"] = "failed"
    data["steps-0-error"] = "forged"

    response = admin_client.post(url, data)
    assert response.status_code == 403  # a run's page is view-only
    assert 'name="_save"' not in admin_client.get(url).content.decode()
    assert Run.objects.values().get(pk=run.pk) == before
    assert list(Step.objects.filter(run=run).values().order_by("index")) == steps_before


def test_runs_changelist_filters_by_status(admin_client, make_agent):
    agent = make_agent(tools=["calculator"], script=SCRIPT)
    ok = drive(submit_run(agent=agent, input="1+1").pk)
    failed = drive(submit_run(agent=agent, input="1+1", model_route="nosuchprovider:m").pk)
    queued = submit_run(agent=agent, input="2+2")
    assert (ok.status, failed.status) == (Run.Status.SUCCEEDED, Run.Status.FAILED)

    response = admin_client.get("/admin/agents/run/?status__exact=failed")
    assert response.status_code == 200
    assert [r.pk for r in response.context["cl"].result_list] == [failed.pk]
    html = response.content.decode()
    assert str(failed.pk) in html
    assert str(ok.pk) not in html and str(queued.pk) not in html

    response = admin_client.get("/admin/agents/run/?status__exact=succeeded")
    assert [r.pk for r in response.context["cl"].result_list] == [ok.pk]


def grant_rows(data: dict[str, Any], *rows: tuple[str, str, str]) -> dict[str, Any]:
    """Replace the tool-grant inline of an admin form's data with ``rows`` of
    (tool name, mode, constraints JSON); existing rows not listed are deleted."""
    existing = int(data.get("grants-INITIAL_FORMS", 0))
    for i in range(existing):
        data[f"grants-{i}-DELETE"] = "on"
    for offset, (name, mode, constraints) in enumerate(rows):
        i = existing + offset
        data[f"grants-{i}-tool"] = str(Tool.objects.get(name=name).pk)
        data[f"grants-{i}-mode"] = mode
        data[f"grants-{i}-constraints"] = constraints
        data[f"grants-{i}-id"] = ""
        data[f"grants-{i}-agent"] = data.get("grants-0-agent", "")
    data["grants-TOTAL_FORMS"] = str(existing + len(rows))
    return data


def test_editing_an_agent_in_the_admin_publishes_a_version_only_on_change(
    admin_client, admin_user, make_agent
):
    agent = make_agent(slug="editme", tools=["calculator"], script=SCRIPT)
    assert agent.current_version.number == 1
    url = f"/admin/agents/agent/{agent.pk}/change/"

    # Saving the form unchanged publishes nothing.
    data = form_data(admin_client.get(url))
    assert data["grants-TOTAL_FORMS"] == "1"
    assert data["grants-0-tool"] == str(Tool.objects.get(name="calculator").pk)
    assert "versions-TOTAL_FORMS" in data
    response = admin_client.post(url, {**data, "_save": "Save"})
    assert response.status_code == 302, response.content.decode()[:3000]
    agent.refresh_from_db()
    assert agent.current_version.number == 1
    assert agent.versions.count() == 1
    assert not any("Published" in m for m in messages_of(response))

    # A changed configuration (grants included) publishes version 2 with the new settings.
    data = form_data(admin_client.get(url))
    data = grant_rows(
        data,
        ("calculator", "allow", "{}"),
        ("knowledge_search", "require_approval", '{"limit": {"max": 2}}'),
    )
    data.update(
        system_prompt="Be brief.",
        escalation_policy='{"min_confidence": 0.5}',
        _save="Save",
    )
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    agent.refresh_from_db()
    version = agent.current_version
    assert version.number == 2 and agent.versions.count() == 2
    assert version.tools == ["calculator", "knowledge_search"]
    assert version.grants == {
        "calculator": {"mode": "allow", "constraints": {}},
        "knowledge_search": {"mode": "require_approval", "constraints": {"limit": {"max": 2}}},
    }
    assert version.system_prompt == "Be brief."
    assert version.escalation_policy == {"min_confidence": 0.5}
    assert version.created_by == admin_user
    assert any("Published editme v2" in m for m in messages_of(response))
    assert AgentVersion.objects.get(agent=agent, number=1).system_prompt == ""
    assert AgentVersion.objects.get(agent=agent, number=1).tools == ["calculator"]


def test_adding_an_agent_in_the_admin_publishes_version_1(admin_client):
    data = form_data(admin_client.get("/admin/agents/agent/add/"))
    data = grant_rows(data, ("calculator", "", "{}"), ("send_email", "", "{}"))
    data.update(slug="added", name="Added", script=json.dumps(SCRIPT), _save="Save")
    response = admin_client.post("/admin/agents/agent/add/", data)
    assert response.status_code == 302, response.content.decode()[:3000]
    agent = Agent.objects.get(slug="added")
    assert agent.current_version.number == 1
    assert agent.current_version.tools == ["calculator", "send_email"]
    # A blank mode takes the tool's default: side-effecting send_email requires approval.
    assert agent.current_version.grants["calculator"]["mode"] == "allow"
    assert agent.current_version.grants["send_email"]["mode"] == "require_approval"
    assert agent.current_version.script == SCRIPT


@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        ('{"expresion": {"max_length": 5}}', "not an argument of this tool"),
        ('{"expression": {"maximum": 5}}', "unknown rule"),
        ('{"expression": {"pattern": "("}}', "not a valid regular expression"),
        ('["expression"]', "JSON object"),
    ],
)
def test_invalid_grant_constraints_are_a_form_error(admin_client, constraints, expected):
    data = form_data(admin_client.get("/admin/agents/agent/add/"))
    data = grant_rows(data, ("calculator", "allow", constraints))
    data.update(slug="badgrant", name="Bad grant", _save="Save")

    response = admin_client.post("/admin/agents/agent/add/", data)
    assert response.status_code == 200
    errors = str(response.context["inline_admin_formsets"][0].formset.errors)
    assert expected in errors
    assert not Agent.objects.filter(slug="badgrant").exists()
    assert not AgentVersion.objects.filter(agent__slug="badgrant").exists()


def test_an_unavailable_tool_cannot_be_granted_in_the_admin(admin_client):
    Tool.objects.create(name="retired_tool", available=False)
    data = form_data(admin_client.get("/admin/agents/agent/add/"))
    data["grants-TOTAL_FORMS"] = "1"
    data.update(
        {"grants-0-tool": str(Tool.objects.get(name="retired_tool").pk), "grants-0-mode": ""}
    )
    data.update(slug="retired", name="Retired", _save="Save")

    response = admin_client.post("/admin/agents/agent/add/", data)
    assert response.status_code == 200
    errors = str(response.context["inline_admin_formsets"][0].formset.errors)
    assert "retired_tool is not installed on this server" in errors
    assert not Agent.objects.filter(slug="retired").exists()


def test_an_agent_with_a_grant_of_a_tool_gone_since_can_still_be_edited(admin_client, make_agent):
    agent = make_agent(slug="keeper", tools=["calculator"], script=SCRIPT)
    Tool.objects.filter(name="calculator").update(available=False)
    url = f"/admin/agents/agent/{agent.pk}/change/"
    data = form_data(admin_client.get(url))
    data.update(system_prompt="Still editable.", _save="Save")

    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    agent.refresh_from_db()
    assert agent.current_version.system_prompt == "Still editable."
    assert agent.current_version.tools == ["calculator"]


def test_invalid_json_in_an_agent_field_is_a_form_error(admin_client, make_agent):
    agent = make_agent(script=SCRIPT)
    url = f"/admin/agents/agent/{agent.pk}/change/"
    data = form_data(admin_client.get(url))
    data.update(script="[{not json", _save="Save")

    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert "script" in response.context["adminform"].form.errors
    agent.refresh_from_db()
    assert agent.script == SCRIPT and agent.current_version.number == 1


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("output_schema", "[" * 5000 + "]" * 5000, "Nested more than 64 levels deep"),
        ("escalation_policy", '{"\\ud800": 1}', "Surrogate characters are not allowed"),
        ("output_schema", '{"type": "\\udfff"}', "Surrogate characters are not allowed"),
        ("script", '[{"text": "a\\u0000b"}]', "must not contain NUL characters"),
    ],
)
def test_json_an_agent_field_cannot_store_is_a_form_error_not_a_500(
    admin_client, make_agent, field, value, expected
):
    agent = make_agent(script=SCRIPT)
    url = f"/admin/agents/agent/{agent.pk}/change/"
    data = form_data(admin_client.get(url))
    data.update({field: value, "_save": "Save"})

    response = admin_client.post(url, data)

    assert response.status_code == 200
    assert expected in str(response.context["adminform"].form.errors[field])
    agent.refresh_from_db()
    assert agent.script == SCRIPT and agent.current_version.number == 1


def test_grant_constraints_nested_too_deeply_are_a_form_error_not_a_500(admin_client):
    data = form_data(admin_client.get("/admin/agents/agent/add/"))
    deep = '{"expression": {"one_of": ' + "[" * 3000 + "]" * 3000 + "}}"
    data = grant_rows(data, ("calculator", "allow", deep))
    data.update(slug="deepgrant", name="Deep grant", _save="Save")

    response = admin_client.post("/admin/agents/agent/add/", data)

    assert response.status_code == 200
    errors = str(response.context["inline_admin_formsets"][0].formset.errors)
    assert "Nested more than 64 levels deep" in errors
    assert not Agent.objects.filter(slug="deepgrant").exists()


def test_cancel_action_cancels_queued_runs_and_reports_finished_ones(admin_client, make_agent):
    agent = make_agent(tools=["calculator"], script=SCRIPT)
    queued = submit_run(agent=agent, input="1+1")
    finished = drive(submit_run(agent=agent, input="2+2").pk)
    assert finished.status == Run.Status.SUCCEEDED

    response = admin_client.post(
        "/admin/agents/run/",
        {"action": "cancel_runs", "_selected_action": [str(queued.pk), str(finished.pk)]},
    )
    assert response.status_code == 302
    assert messages_of(response) == ["Cancelled 1 runs; 1 had already finished."]
    queued.refresh_from_db()
    finished.refresh_from_db()
    assert queued.status == Run.Status.CANCELLED and queued.error_code == "cancelled"
    assert "admin" in queued.error
    assert finished.status == Run.Status.SUCCEEDED
    event = AuditEvent.objects.get(run=queued, action="run.cancelled")
    assert (event.actor_type, event.actor) == ("user", "admin")


def test_provider_api_key_is_write_only_and_encrypted(admin_client):
    key = "sk-live-VERY-secret-0123456789"
    data = form_data(admin_client.get("/admin/agents/modelprovider/add/"))
    data.update(
        name="myprov",
        base_url="http://127.0.0.1:9/v1",
        timeout_seconds="7.5",
        enabled="on",
        api_key=key,
        _save="Save",
    )
    response = admin_client.post("/admin/agents/modelprovider/add/", data)
    assert response.status_code == 302, response.content.decode()[:3000]

    provider = ModelProvider.objects.get(name="myprov")
    assert provider.api_key_encrypted and provider.api_key_encrypted != key
    assert key not in provider.api_key_encrypted
    assert AuditEvent.objects.filter(action="provider.key_changed").exists()
    assert key not in str(list(AuditEvent.objects.values_list("payload", flat=True)))

    url = f"/admin/agents/modelprovider/{provider.pk}/change/"
    page = admin_client.get(url)
    html = page.content.decode()
    assert key not in html and provider.api_key_encrypted not in html
    assert key not in admin_client.get("/admin/agents/modelprovider/").content.decode()

    # Editing without re-entering the key keeps it.
    data = form_data(page)
    assert data.get("api_key", "") == ""
    data.update(timeout_seconds="9", _save="Save")
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    provider.refresh_from_db()
    assert provider.timeout_seconds == 9.0 and provider.has_api_key

    route_provider, model = resolve_route("myprov:m")
    assert model == "m"
    assert route_provider._api_key == key
    assert route_provider.timeout == 9.0


def test_provider_key_can_be_replaced_and_cleared(admin_client):
    provider = ModelProvider.objects.create(name="p2", base_url="http://127.0.0.1:9/v1")
    url = f"/admin/agents/modelprovider/{provider.pk}/change/"

    data = form_data(admin_client.get(url))
    admin_client.post(url, {**data, "api_key": "sk-one", "_save": "Save"})
    assert resolve_route("p2:m")[0]._api_key == "sk-one"

    data = form_data(admin_client.get(url))
    admin_client.post(url, {**data, "clear_api_key": "on", "_save": "Save"})
    provider.refresh_from_db()
    assert provider.api_key_encrypted == "" and not provider.has_api_key
    assert resolve_route("p2:m")[0]._api_key == ""


def test_the_scripted_provider_name_is_rejected_in_the_admin(admin_client):
    data = form_data(admin_client.get("/admin/agents/modelprovider/add/"))
    data.update(name="scripted", base_url="http://127.0.0.1:9/v1", timeout_seconds="5")
    response = admin_client.post("/admin/agents/modelprovider/add/", {**data, "_save": "Save"})
    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors
    assert not ModelProvider.objects.filter(name="scripted").exists()
