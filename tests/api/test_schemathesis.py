"""Schemathesis against the live API (uvicorn on the test database, a real worker): every
operation of ``/api/schema/``, called with a valid key, must not answer 5xx and must answer what
the schema says. Real ids (the caller's runs, the seeded agents) are tried beside generated ones,
so the by-id paths are exercised with data, not only with 404s.

The schema is generated in this process at import, so pytest collects one test per operation,
and ``test_the_served_schema_is_the_one_tested`` checks that ``/api/schema/`` serves exactly it.
(``schemathesis.pytest.from_fixture`` would load it from the live server instead, but
schemathesis 4.32 sets ``request.node._nodeid``, which pytest 9 no longer has.)
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import OperationalError
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from agents.models import Agent, Run
from agents.services import create_api_key, submit_run
from harness.polling import poll

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CHECKS = [not_a_server_error, response_schema_conformance]
# status_code_conformance is left out: the schema leaves out statuses the API rightly answers
# (see test_every_status_the_api_answers_is_documented).
EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


def generated_schema() -> dict[str, Any]:
    """What ``GET /api/schema/`` serves, as JSON."""
    document = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(OpenApiJsonRenderer().render(document))


SCHEMA = generated_schema()
schema = schemathesis.openapi.from_dict(SCHEMA)


@dataclass
class ApiData:
    base_url: str
    user: User
    key: str
    run_ids: list[str]
    agent_slugs: list[str]

    def fresh_key(self) -> str:
        return create_api_key(user=self.user, name="schemathesis")[1]


@pytest.fixture
def api_data(api_server: Any, celery_worker: Any) -> Iterator[ApiData]:
    """Seeded agents, and runs of the key's user: two finished (with steps and events) and one
    queued (never nudged, so it stays cancellable); also a run of another user."""
    call_command("seed_demo", stdout=io.StringIO())
    user = User.objects.create_user(username=f"schemathesis-{uuid.uuid4().hex[:6]}")
    _, plain = create_api_key(user=user, name="schemathesis")
    someone = User.objects.create_user(username=f"someone-{uuid.uuid4().hex[:6]}")
    # Submitted without the key (the caller sees runs by owner): holding the key's row lock
    # here would race the worker (see test_back_to_back_submissions_are_all_accepted).
    submitted = [
        submit_run(agent="support-assistant", input="refund?", owner=user),
        submit_run(agent="math-tutor", input="6 * 7", owner=user),
        submit_run(agent="math-tutor", input="1 + 1", owner=someone),
    ]
    agent = Agent.objects.get(slug="support-assistant")
    assert agent.current_version is not None
    queued = Run.objects.create(
        agent=agent,
        agent_version=agent.current_version,
        model_route=agent.current_version.model_route,
        owner=user,
        input="waiting",
    )
    poll(
        lambda: all(Run.objects.get(pk=r.pk).is_final for r in submitted),
        timeout=60,
        what="the seeded runs to finish",
    )
    yield ApiData(
        base_url=api_server.base_url,
        user=user,
        key=plain,
        run_ids=[str(submitted[0].pk), str(submitted[1].pk), str(queued.pk)],
        agent_slugs=["support-assistant", "math-tutor"],
    )
    # The runs submitted while fuzzing finish (or are dropped) before the database is flushed
    # under the worker.
    active = Run.objects.exclude(pk=queued.pk).filter(status__in=Run.ACTIVE_STATUSES)
    try:
        poll(lambda: not active.exists(), timeout=20, interval=0.1)
    except AssertionError:
        for _ in range(5):
            try:
                active.update(status=Run.Status.CANCELLED)
                break
            except OperationalError:  # a deadlock with the worker: try again
                time.sleep(0.2)
        time.sleep(0.5)


def exercise(case: Any, data: ApiData, checks: list[Any]) -> None:
    """Call the generated case, then the same request on real data."""

    def call(key: str = data.key) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        case.call_and_validate(base_url=data.base_url, headers=headers, checks=checks)

    call()
    path_parameters = case.path_parameters or {}
    if "id" in path_parameters:
        for run_id in data.run_ids:
            path_parameters["id"] = run_id
            call()
    if "slug" in path_parameters:
        for slug in data.agent_slugs:
            path_parameters["slug"] = slug
            call()
    if case.method == "POST" and case.path == "/api/v1/runs/" and isinstance(case.body, dict):
        # A real agent, so the request gets past the lookup; then without the webhook and the
        # session, so unless its input is invalid it is accepted (each with a key of its own, so
        # the per-key cap on unfinished runs never answers for the body).
        case.body["agent"] = data.agent_slugs[0]
        call(data.fresh_key())
        case.body.pop("webhook_url", None)
        case.body.pop("session", None)
        call(data.fresh_key())


def test_the_served_schema_is_the_one_tested(api_server: Any) -> None:
    response = httpx.get(
        f"{api_server.base_url}/api/schema/",
        headers={"Accept": "application/vnd.oai.openapi+json"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == SCHEMA
    operations = {(m.upper(), p) for p, ops in SCHEMA["paths"].items() for m in ops}
    assert operations == {
        ("GET", "/api/v1/agents/"),
        ("GET", "/api/v1/agents/{slug}/"),
        ("GET", "/api/v1/runs/"),
        ("POST", "/api/v1/runs/"),
        ("GET", "/api/v1/runs/{id}/"),
        ("POST", "/api/v1/runs/{id}/cancel/"),
        ("GET", "/api/v1/runs/{id}/events/"),
        ("GET", "/api/v1/runs/{id}/steps/"),
        ("GET", "/api/v1/approvals/"),
        ("GET", "/api/v1/approvals/{id}/"),
        ("POST", "/api/v1/approvals/{id}/decision/"),
        ("GET", "/api/v1/whoami/"),
        ("GET", "/api/v1/usage/"),
    }


@schema.exclude(method="POST").parametrize()
@EXAMPLES
def test_read_operations_conform_to_the_schema(case: Any, api_data: ApiData) -> None:
    exercise(case, api_data, CHECKS)


@schema.include(method="POST").parametrize()
@EXAMPLES
def test_submit_and_cancel_conform_to_the_schema(case: Any, api_data: ApiData) -> None:
    exercise(case, api_data, CHECKS)


@schema.include(method="POST").parametrize()
@EXAMPLES
def test_submit_and_cancel_never_answer_a_server_error(case: Any, api_data: ApiData) -> None:
    """5xx from submit and cancel fail the suite whatever the schema checks say."""
    exercise(case, api_data, [not_a_server_error])


# --- Schema defects shown directly ------------------------------------------------------------


def documented(method: str, path: str) -> set[int]:
    return {int(code) for code in SCHEMA["paths"][path][method.lower()]["responses"]}


def test_list_and_retrieve_runs_document_their_200_response() -> None:
    assert 200 in documented("GET", "/api/v1/runs/")
    assert 200 in documented("GET", "/api/v1/runs/{id}/")


def test_every_status_the_api_answers_is_documented(api_data: ApiData) -> None:
    good = httpx.Client(
        base_url=api_data.base_url, headers={"Authorization": f"Bearer {api_data.key}"}
    )
    anonymous = httpx.Client(base_url=api_data.base_url)
    unknown = str(uuid.uuid4())
    calls = [
        (anonymous, "GET", "/api/v1/agents/", "/api/v1/agents/"),
        (anonymous, "GET", "/api/v1/agents/math-tutor/", "/api/v1/agents/{slug}/"),
        (good, "GET", "/api/v1/agents/no-such-agent/", "/api/v1/agents/{slug}/"),
        (anonymous, "GET", f"/api/v1/runs/{unknown}/", "/api/v1/runs/{id}/"),
        (good, "GET", f"/api/v1/runs/{unknown}/steps/", "/api/v1/runs/{id}/steps/"),
        (good, "POST", f"/api/v1/runs/{unknown}/cancel/", "/api/v1/runs/{id}/cancel/"),
        (anonymous, "POST", f"/api/v1/runs/{unknown}/cancel/", "/api/v1/runs/{id}/cancel/"),
    ]
    undocumented = []
    with good, anonymous:
        for client, method, url, path in calls:
            status = client.request(method, url).status_code
            assert status in (401, 404), (method, url, status)
            if status not in documented(method, path):
                undocumented.append(f"{method} {path} answers {status}")
    assert not undocumented, undocumented
