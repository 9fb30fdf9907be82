"""The OpenAPI schema, the offline Swagger UI, the agents endpoints and the error shape of
Django-level errors (unknown paths, methods not allowed)."""

from __future__ import annotations

import re
import uuid

import pytest
import yaml
from django.contrib.staticfiles import finders
from rest_framework.test import APIClient

from agents.models import Agent, Run
from agents.services import save_agent
from approvals.models import Approval
from tests.support.api import assert_error
from tests.support.engine import drive

pytestmark = pytest.mark.django_db

PATHS = [
    "/api/v1/agents/",
    "/api/v1/agents/{slug}/",
    "/api/v1/runs/",
    "/api/v1/runs/{id}/",
    "/api/v1/runs/{id}/steps/",
    "/api/v1/runs/{id}/cancel/",
    "/api/v1/runs/{id}/events/",
]


@pytest.fixture
def schema(db: None) -> dict:
    response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200, response.content[:500]
    return response.json()


# --- schema -------------------------------------------------------------------------------------


def test_the_schema_is_openapi_3_with_every_path(schema):
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "Agentsite API"
    for path in PATHS:
        assert path in schema["paths"], path
    assert not [p for p in schema["paths"] if not p.startswith("/api/v1/")]


def test_the_schema_documents_the_methods_of_each_path(schema):
    methods = {
        path: {m for m in item if m in {"get", "post", "put", "patch", "delete"}}
        for path, item in schema["paths"].items()
    }
    assert methods["/api/v1/agents/"] == {"get"}
    assert methods["/api/v1/agents/{slug}/"] == {"get"}
    assert methods["/api/v1/runs/"] == {"get", "post"}
    assert methods["/api/v1/runs/{id}/"] == {"get"}
    assert methods["/api/v1/runs/{id}/steps/"] == {"get"}
    assert methods["/api/v1/runs/{id}/cancel/"] == {"post"}
    assert methods["/api/v1/runs/{id}/events/"] == {"get"}


def test_the_schema_documents_submission(schema):
    create = schema["paths"]["/api/v1/runs/"]["post"]
    assert "202" in create["responses"] and "409" in create["responses"]
    headers = [p["name"] for p in create["parameters"] if p["in"] == "header"]
    assert "Idempotency-Key" in headers
    listing = schema["paths"]["/api/v1/runs/"]["get"]
    query = {p["name"] for p in listing["parameters"] if p["in"] == "query"}
    assert query >= {"status", "agent", "created_after", "created_before", "limit", "offset"}
    events = schema["paths"]["/api/v1/runs/{id}/events/"]["get"]
    assert "after" in {p["name"] for p in events["parameters"] if p["in"] == "query"}
    request = schema["components"]["schemas"]["RunCreateRequest"]
    assert set(request["properties"]) == {
        "agent",
        "input",
        "session",
        "metadata",
        "webhook_url",
        "on_conflict",
        "budget",
    }
    assert set(request["required"]) == {"agent", "input"}


def test_every_error_response_is_documented_with_the_one_error_shape(schema):
    errors = {
        (method, path, code): response.get("content")
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post"}
        for code, response in operation["responses"].items()
        if code >= "400"
    }
    assert len(errors) > 30
    shared = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    assert {where: content for where, content in errors.items() if content != shared} == {}
    components = schema["components"]["schemas"]
    assert components["ErrorResponse"]["required"] == ["error"]
    detail = components["ErrorDetail"]
    assert set(detail["properties"]) == set(detail["required"]) == {"code", "message", "fields"}
    assert detail["properties"]["fields"]["additionalProperties"] == {
        "type": "array",
        "items": {"type": "string"},
    }


def test_every_operation_documents_the_429_of_the_request_rate(schema):
    # Every endpoint counts against AGENTSITE_API_RATE_LIMIT (whoami and usage too).
    missing = [
        (method, path)
        for path, item in schema["paths"].items()
        if path.startswith("/api/v1/")
        for method, operation in item.items()
        if method in {"get", "post"} and "429" not in operation["responses"]
    ]
    assert missing == []


def test_the_schema_documents_the_body_errors_of_every_post(schema):
    def documented(method, path):
        return set(schema["paths"][path][method]["responses"])

    assert {"400", "413", "415"} <= documented("post", "/api/v1/runs/")
    assert {"400", "413", "415"} <= documented("post", "/api/v1/approvals/{id}/decision/")
    assert "413" in documented("post", "/api/v1/runs/{id}/cancel/")


def test_every_status_a_submission_answers_is_documented(schema, make_client, agent, settings):
    client = make_client()
    settings.AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY = 1

    def post(body, **extra):
        return client.post("/api/v1/runs/", body, content_type="application/json", **extra)

    responses = [
        post({"agent": "helper", "input": "x"}, HTTP_IDEMPOTENCY_KEY="k"),
        post({"agent": "helper", "input": "y"}, HTTP_IDEMPOTENCY_KEY="k"),
        post({"agent": "helper", "input": "z"}),  # over the cap on unfinished runs
        post({"agent": "helper"}),
        post('{"agent": "helper", "input": '),
        post('{"agent": "helper", "input": ' + "[" * 1000 + "]" * 1000 + "}"),
        post('{"agent": "helper", "input": "\\ud800"}'),
        post('"' + "x" * settings.AGENTSITE_MAX_REQUEST_BYTES + '"'),
        client.post("/api/v1/runs/", "agent=helper", content_type="text/plain"),
        APIClient().post("/api/v1/runs/", {"agent": "helper", "input": "x"}, format="json"),
    ]

    answered = [response.status_code for response in responses]
    assert answered == [202, 409, 429, 400, 400, 400, 400, 413, 415, 401]
    documented = schema["paths"]["/api/v1/runs/"]["post"]["responses"]
    assert {str(status) for status in answered} <= set(documented)
    for response in responses[1:]:
        assert_error(response, response.status_code)


def test_the_events_endpoint_documents_its_stream_and_its_429(schema):
    responses = schema["paths"]["/api/v1/runs/{id}/events/"]["get"]["responses"]
    ok = responses["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/EventPage"}
    assert ok["text/event-stream"]["schema"] == {"type": "string"}
    assert "Accept: text/event-stream" in responses["200"]["description"]
    assert "streams" in responses["429"]["description"]


def test_the_schema_documents_bearer_auth(schema):
    schemes = schema["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["ApiKey"].items()


def run_representations(client, agent) -> list[dict]:
    """A queued, a succeeded and a cancelled run, as the API renders them."""
    from tests.support.engine import drive

    def submit() -> str:
        response = client.post("/api/v1/runs/", {"agent": "helper", "input": "x"}, format="json")
        assert response.status_code == 202
        return response.json()["id"]

    queued, done, cancelled = submit(), submit(), submit()
    drive(done)
    client.post(f"/api/v1/runs/{cancelled}/cancel/")
    return [client.get(f"/api/v1/runs/{i}/").json() for i in (queued, done, cancelled)]


def test_the_run_schema_allows_the_nulls_the_api_returns(schema, client_a, agent):
    properties = schema["components"]["schemas"]["Run"]["properties"]
    nulls = {
        name
        for run in run_representations(client_a, agent)
        for name, value in run.items()
        if value is None and name != "pending_approval"  # see the next test
    }
    assert nulls >= {"result", "error", "session", "webhook", "started_at", "finished_at"}
    for name in nulls:
        assert properties[name].get("nullable") is True, (name, properties[name])


def test_the_run_schema_allows_a_null_pending_approval(schema, client_a, agent):
    runs = run_representations(client_a, agent)
    assert all(run["pending_approval"] is None for run in runs)
    assert (
        schema["components"]["schemas"]["Run"]["properties"]["pending_approval"].get("nullable")
        is True
    )


def test_a_run_waiting_for_a_reviewer_shows_its_pending_approval(schema, client_a, make_agent):
    make_agent(
        slug="asker",
        grants={"calculator": "require_approval"},
        script=[
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]},
            {"text": "{tool_results}"},
        ],
    )
    response = client_a.post("/api/v1/runs/", {"agent": "asker", "input": "x"}, format="json")
    run_id = response.json()["id"]
    drive(run_id)

    body = client_a.get(f"/api/v1/runs/{run_id}/").json()
    assert body["status"] == "waiting_approval"
    pending = body["pending_approval"]
    assert pending["reason"] == "tool_requires_approval" and pending["tool"] == "calculator"
    assert pending["step_index"] == 1 and pending["count"] == 1
    assert pending["id"] == str(Approval.objects.get(run_id=run_id).pk)
    declared = schema["components"]["schemas"]["PendingApproval"]["properties"]
    assert set(pending) == set(declared)


def test_the_schema_is_also_served_as_yaml(db):
    response = APIClient().get("/api/schema/")
    assert response.status_code == 200
    document = yaml.safe_load(response.content)
    assert document["openapi"].startswith("3.") and set(PATHS) <= set(document["paths"])


# --- Swagger UI ---------------------------------------------------------------------------------


def test_the_docs_are_html_that_loads_only_local_static_files(db):
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "swagger-ui" in html and "/api/schema/" in html
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html), html
    assert "cdn" not in html.lower() and "unpkg" not in html and "jsdelivr" not in html
    assets = re.findall(r"""(?:src|href)="([^"]+)\"""", html)
    assert assets and all(a.startswith("/static/") for a in assets), assets
    for asset in assets:
        assert finders.find(asset.removeprefix("/static/").split("?")[0]), asset


def test_the_docs_static_files_are_served(db):
    html = APIClient().get("/api/docs/").content.decode()
    script = re.search(r'<script src="(/static/[^"]+swagger-ui-bundle[^"]*)"', html)
    assert script is not None, html
    path = script.group(1).removeprefix("/static/")
    assert finders.find(path)


# --- agents -------------------------------------------------------------------------------------


def test_agents_lists_active_agents_with_their_version_and_tools(client_a, make_agent):
    make_agent(
        slug="calc",
        name="Calculator",
        description="Does sums.",
        tools=["calculator"],
        script=[{"text": "ok"}],
    )
    make_agent(slug="idle", is_active=False)
    Agent.objects.create(slug="draft", name="Draft")  # never published: no version

    response = client_a.get("/api/v1/agents/")

    assert response.status_code == 200
    page = response.json()
    assert page["count"] == 1
    (calc,) = page["results"]
    assert set(calc) == {"slug", "name", "description", "version", "model_route", "tools"}
    assert calc["slug"] == "calc" and calc["name"] == "Calculator"
    assert calc["description"] == "Does sums." and calc["version"] == 1
    assert calc["model_route"] == "scripted:demo"
    (tool,) = calc["tools"]
    assert tool["name"] == "calculator" and tool["description"]
    assert tool["parameters"]["type"] == "object"
    assert "expression" in tool["parameters"]["properties"]


def test_agent_detail_shows_the_current_version(client_a, make_agent):
    agent = make_agent(slug="calc", tools=["calculator"])
    save_agent(agent=agent, grants={"calculator": "allow", "knowledge_search": "require_approval"})

    response = client_a.get("/api/v1/agents/calc/")

    assert response.status_code == 200
    body = response.json()
    assert body["slug"] == "calc" and body["version"] == 2
    assert {t["name"]: t["mode"] for t in body["tools"]} == {
        "calculator": "allow",
        "knowledge_search": "require_approval",
    }
    for tool in body["tools"]:
        assert tool["parameters"]["type"] == "object" and tool["parameters"]["properties"]


def test_an_unknown_agent_answers_404_in_the_error_shape(client_a, make_agent):
    make_agent(slug="idle", is_active=False)

    error = assert_error(client_a.get("/api/v1/agents/nobody/"), 404, "not_found")
    assert "not found" in error["message"].lower()
    assert_error(client_a.get("/api/v1/agents/idle/"), 404, "not_found")


# --- Django-level errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/nope", "/api/nope/", "/api/v1/nope/", "/api/v2/runs/", "/api/v1/runs/x/y/"]
)
def test_an_unknown_api_path_answers_404_in_the_error_shape(client_a, path):
    error = assert_error(client_a.get(path), 404, "not_found")
    assert error["message"] == "Not found."


def test_an_unknown_api_path_answers_404_without_credentials_too(db):
    assert_error(APIClient().get("/api/nothing-here/"), 404, "not_found")


def test_an_unknown_path_outside_the_api_is_not_json(db):
    response = APIClient().get("/no-such-page/")
    assert response.status_code == 404
    assert not response["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("method", ["delete", "put", "patch"])
def test_a_method_not_allowed_on_a_run_answers_405_in_the_error_shape(client_a, agent, method):
    response = client_a.post("/api/v1/runs/", {"agent": "helper", "input": "x"}, format="json")
    run_id = response.json()["id"]

    response = getattr(client_a, method)(f"/api/v1/runs/{run_id}/", {}, format="json")

    error = assert_error(response, 405, "method_not_allowed")
    assert method.upper() in error["message"]
    assert "GET" in response["Allow"] and method.upper() not in response["Allow"]
    assert Run.objects.filter(pk=run_id).exists()


def test_a_method_not_allowed_on_the_runs_list_answers_405(client_a):
    error = assert_error(client_a.delete("/api/v1/runs/"), 405, "method_not_allowed")
    assert "DELETE" in error["message"]


def test_a_method_not_allowed_on_events_answers_405(client_a, agent):
    response = client_a.post("/api/v1/runs/", {"agent": "helper", "input": "x"}, format="json")
    run_id = response.json()["id"]

    assert_error(client_a.post(f"/api/v1/runs/{run_id}/events/"), 405, "method_not_allowed")


def test_a_method_not_allowed_on_agents_answers_405(client_a, agent):
    assert_error(
        client_a.post("/api/v1/agents/", {"slug": "x"}, format="json"), 405, "method_not_allowed"
    )
    assert_error(client_a.delete("/api/v1/agents/helper/"), 405, "method_not_allowed")
    assert Agent.objects.filter(slug="helper").exists()


def test_delete_of_any_run_id_answers_405(client_a):
    error = assert_error(
        client_a.delete(f"/api/v1/runs/{uuid.uuid4()}/"), 405, "method_not_allowed"
    )
    assert "DELETE" in error["message"]


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_a_method_not_allowed_on_events_answers_405_with_csrf_checks_on(make_client, agent, method):
    client = make_client()
    response = client.post("/api/v1/runs/", {"agent": "helper", "input": "x"}, format="json")
    run_id = response.json()["id"]
    strict = APIClient(enforce_csrf_checks=True)  # as a real client: no CSRF token, no cookie
    strict.credentials(HTTP_AUTHORIZATION=f"Bearer {client.plain_key}")

    response = getattr(strict, method)(f"/api/v1/runs/{run_id}/events/")

    assert_error(response, 405, "method_not_allowed")


def test_api_key_clients_need_no_csrf_token_for_the_drf_views(make_client, agent):
    client = make_client()
    strict = APIClient(enforce_csrf_checks=True)
    strict.credentials(HTTP_AUTHORIZATION=f"Bearer {client.plain_key}")

    response = strict.post("/api/v1/runs/", {"agent": "helper", "input": "x"}, format="json")
    assert response.status_code == 202
    assert strict.post(f"/api/v1/runs/{response.json()['id']}/cancel/").status_code == 202
