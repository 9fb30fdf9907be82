"""The runs API over HTTP (DRF's APIClient), against the real test database.

No worker is involved: inside the test transaction on_commit callbacks never fire, so nothing is
published, and runs are advanced in-process with ``tests.support.engine.drive`` where a test
needs it.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync
from django.db import connection, transaction
from django.test.client import AsyncClientHandler, FakePayload
from django.utils import timezone

from agents.models import Run, Session
from agentsite import outbound, rediskeys
from agentsite.pagination import ClampedLimitOffsetPagination
from audittrail.models import AuditEvent
from tests.support.api import assert_error, nested
from tests.support.engine import drive

pytestmark = pytest.mark.django_db

RUNS = "/api/v1/runs/"
RUN_FIELDS = {
    "id",
    "agent",
    "agent_version",
    "status",
    "input",
    "result",
    "error",
    "usage",
    "budget",
    "session",
    "metadata",
    "model_route",
    "trace_id",
    "webhook",
    "pending_approval",
    "created_at",
    "started_at",
    "finished_at",
    "links",
}
CALCULATE = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "Result: {last_tool_result}"},
]


def post_run(client: Any, body: Any = None, **extra: Any) -> Any:
    return client.post(RUNS, body if body is not None else {}, format="json", **extra)


def submit(client: Any, agent: str = "helper", input: Any = "world", **fields: Any) -> Any:
    response = post_run(client, {"agent": agent, "input": input, **fields})
    assert response.status_code == 202, response.content
    return response


def run_url(run_id: Any, tail: str = "") -> str:
    return f"{RUNS}{run_id}/{tail}"


def read_stream(response: Any) -> str:
    """The whole body of a Server-Sent Events response (an async iterator)."""

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(collect)().decode()


# --- submit -------------------------------------------------------------------------------------


def test_submit_answers_202_with_the_whole_run_representation(client_a, agent):
    response = post_run(
        client_a, {"agent": "helper", "input": "world", "metadata": {"ticket": "T-1"}}
    )

    assert response.status_code == 202
    body = response.json()
    assert set(body) == RUN_FIELDS
    run = Run.objects.get()
    assert body["id"] == str(run.pk)
    assert response["Location"] == f"/api/v1/runs/{run.pk}/"
    assert "Idempotent-Replayed" not in response
    assert body["agent"] == "helper"
    assert body["agent_version"] == 1
    assert body["status"] == "queued"
    assert body["input"] == "world"
    assert body["result"] is None and body["error"] is None
    assert body["usage"] == {"input_tokens": 0, "output_tokens": 0, "cost": "0.000000"}
    assert body["session"] is None
    assert body["metadata"] == {"ticket": "T-1"}
    assert body["model_route"] == "scripted:demo"
    assert body["trace_id"] == run.trace_id and len(run.trace_id) == 32
    assert body["webhook"] is None and body["pending_approval"] is None
    assert body["created_at"] and body["started_at"] is None and body["finished_at"] is None
    assert body["links"] == {
        "self": f"/api/v1/runs/{run.pk}/",
        "steps": f"/api/v1/runs/{run.pk}/steps/",
        "events": f"/api/v1/runs/{run.pk}/events/",
        "cancel": f"/api/v1/runs/{run.pk}/cancel/",
    }
    assert run.owner == client_a.user and run.api_key == client_a.api_key
    assert run.agent_version == agent.current_version


def test_submit_accepts_an_object_as_input(client_a, agent):
    body = submit(client_a, input={"question": "why?", "n": 2}).json()

    assert body["input"] == {"question": "why?", "n": 2}
    assert Run.objects.get().input == {"question": "why?", "n": 2}


def test_get_run_returns_the_same_representation_and_its_result_once_driven(client_a, agent):
    run_id = submit(client_a).json()["id"]
    queued = client_a.get(run_url(run_id))
    assert queued.status_code == 200
    assert set(queued.json()) == RUN_FIELDS and queued.json()["status"] == "queued"

    drive(run_id)
    body = client_a.get(run_url(run_id)).json()

    assert body["status"] == "succeeded"
    assert body["result"] == "Hello, world!"
    assert body["error"] is None
    assert body["started_at"] and body["finished_at"]
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0


def test_get_an_unknown_run_answers_404_in_the_error_shape(client_a, agent):
    error = assert_error(client_a.get(run_url(uuid.uuid4())), 404, "not_found")
    assert "not found" in error["message"].lower()


@pytest.mark.parametrize(
    "run_id", ["------------------------------------", "0123456789abcdef0123456789abcdef-"]
)
def test_ids_matching_the_route_but_not_uuids_answer_404_not_500(client_a, agent, run_id):
    assert_error(client_a.get(run_url(run_id)), 404, "not_found")
    assert_error(client_a.get(run_url(run_id, "steps/")), 404, "not_found")
    assert_error(client_a.post(run_url(run_id, "cancel/")), 404, "not_found")


def test_a_run_id_that_is_not_a_uuid_answers_404_in_the_error_shape(client_a, agent):
    assert_error(client_a.get(run_url("not-a-run")), 404, "not_found")


# --- listing ------------------------------------------------------------------------------------


def make_runs(client: Any, n: int, agent: str = "helper") -> list[str]:
    return [submit(client, agent=agent, input=f"q{i}").json()["id"] for i in range(n)]


def test_list_is_paginated_newest_first(client_a, agent):
    ids = make_runs(client_a, 5)

    first = client_a.get(RUNS, {"limit": 2})
    assert first.status_code == 200
    page = first.json()
    assert set(page) == {"count", "next", "previous", "results"}
    assert page["count"] == 5 and page["previous"] is None
    assert [r["id"] for r in page["results"]] == ids[::-1][:2]
    assert set(page["results"][0]) == RUN_FIELDS

    assert "limit=2" in page["next"] and "offset=2" in page["next"]
    second = client_a.get(page["next"]).json()
    assert [r["id"] for r in second["results"]] == ids[::-1][2:4]
    third = client_a.get(RUNS, {"limit": 2, "offset": 4}).json()
    assert [r["id"] for r in third["results"]] == ids[:1] and third["next"] is None


def test_list_default_page_size_is_the_configured_page_size(client_a, agent):
    from django.conf import settings

    make_runs(client_a, settings.REST_FRAMEWORK["PAGE_SIZE"] + 1)

    page = client_a.get(RUNS).json()

    assert len(page["results"]) == settings.REST_FRAMEWORK["PAGE_SIZE"]
    assert page["next"] is not None


def test_list_limit_is_clamped_to_the_maximum_page_size(client_a, agent, monkeypatch):
    # The class reads AGENTSITE_API_MAX_PAGE_SIZE once, at import: the settings fixture cannot
    # lower it for a test, so the class attribute is patched to keep the test small.
    from django.conf import settings

    assert ClampedLimitOffsetPagination.max_limit == settings.AGENTSITE_API_MAX_PAGE_SIZE
    monkeypatch.setattr(ClampedLimitOffsetPagination, "max_limit", 3)
    make_runs(client_a, 5)

    response = client_a.get(RUNS, {"limit": 100000})

    assert response.status_code == 200
    page = response.json()
    assert page["count"] == 5 and len(page["results"]) == 3
    assert "limit=3" in page["next"]


def test_list_limit_is_clamped_to_the_configured_maximum(client_a, agent):
    from django.conf import settings

    maximum = settings.AGENTSITE_API_MAX_PAGE_SIZE
    oldest = submit(client_a).json()["id"]
    Run.objects.bulk_create(
        Run(
            agent=agent,
            agent_version=agent.current_version,
            owner=client_a.user,
            model_route="scripted:demo",
            input="bulk",
        )
        for _ in range(maximum)
    )

    page = client_a.get(RUNS, {"limit": 100000}).json()

    assert page["count"] == maximum + 1
    assert len(page["results"]) == maximum
    assert oldest not in {r["id"] for r in page["results"]}


def test_setting_a_lower_max_page_size_at_run_time_has_no_effect(client_a, agent, settings):
    """Documents current behaviour: the maximum is fixed when the pagination module loads."""
    settings.AGENTSITE_API_MAX_PAGE_SIZE = 2
    make_runs(client_a, 3)

    page = client_a.get(RUNS, {"limit": 100000}).json()

    assert len(page["results"]) == 3


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"status": "bogus"}, "status"),
        ({"agent": "not a slug!"}, "agent"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2024-13-45T00:00:00Z"}, "created_before"),
    ],
)
def test_bad_filter_values_answer_400_naming_the_field(client_a, agent, params, field):
    error = assert_error(client_a.get(RUNS, params), 400, "invalid", field=field)
    assert error["message"].startswith(f"{field}:")


def test_unknown_query_parameters_are_refused_with_400_naming_them(client_a, agent):
    error = assert_error(client_a.get(RUNS, {"colour": "blue"}), 400, "invalid", field="colour")
    assert "colour" in error["message"]


def test_the_format_query_parameter_of_the_browsable_api_is_accepted(client_a, agent):
    submit(client_a)
    response = client_a.get(RUNS, {"format": "json"})
    assert response.status_code == 200
    assert response.json()["count"] == 1


def test_list_filters_by_status_and_agent(client_a, agent, make_agent):
    make_agent(slug="other", script=[{"text": "ok"}])
    done = submit(client_a).json()["id"]
    drive(done)
    queued = submit(client_a).json()["id"]
    other = submit(client_a, agent="other").json()["id"]

    def ids(**params: Any) -> set[str]:
        response = client_a.get(RUNS, params)
        assert response.status_code == 200, response.content
        return {r["id"] for r in response.json()["results"]}

    assert ids() == {done, queued, other}
    assert ids(status="succeeded") == {done}
    assert ids(status="queued") == {queued, other}
    assert ids(agent="helper") == {done, queued}
    assert ids(agent="other", status="queued") == {other}
    assert ids(agent="nobody") == set()
    assert ids(status="cancelled") == set()
    filtered = client_a.get(RUNS, {"status": "queued", "limit": 1}).json()
    assert filtered["count"] == 2 and "status=queued" in filtered["next"]
    assert {r["id"] for r in client_a.get(filtered["next"]).json()["results"]} <= {queued, other}


def test_list_filters_by_created_range(client_a, agent):
    old, middle, new = make_runs(client_a, 3)
    now = timezone.now()
    Run.objects.filter(pk=old).update(created_at=now - timedelta(days=3))
    Run.objects.filter(pk=middle).update(created_at=now - timedelta(days=2))
    boundary = Run.objects.get(pk=middle).created_at

    def ids(**params: Any) -> list[str]:
        response = client_a.get(RUNS, params)
        assert response.status_code == 200, response.content
        return [r["id"] for r in response.json()["results"]]

    assert ids(created_after=boundary.isoformat()) == [new, middle]  # inclusive
    assert ids(created_before=boundary.isoformat()) == [old]  # exclusive
    assert ids(
        created_after=(now - timedelta(days=4)).isoformat(),
        created_before=(now - timedelta(days=1)).isoformat(),
    ) == [middle, old]
    assert ids(created_after=(now + timedelta(days=1)).isoformat()) == []


# --- steps, cancel, events ----------------------------------------------------------------------


def test_steps_lists_every_step_with_its_details(client_a, make_agent):
    make_agent(slug="calc", tools=["calculator"], script=CALCULATE)
    run_id = submit(client_a, agent="calc", input="6*7").json()["id"]
    assert client_a.get(run_url(run_id, "steps/")).json() == []

    drive(run_id)
    response = client_a.get(run_url(run_id, "steps/"))

    assert response.status_code == 200
    steps = response.json()
    assert [(s["index"], s["kind"], s["status"]) for s in steps] == [
        (0, "model", "succeeded"),
        (1, "tool", "succeeded"),
        (2, "model", "succeeded"),
    ]
    model, tool, answer = steps
    assert set(tool) >= {
        "attempts",
        "latency_ms",
        "input_tokens",
        "output_tokens",
        "tool_name",
        "arguments",
        "output",
        "parent_index",
        "model_route",
        "error",
    }
    assert tool["tool_name"] == "calculator" and tool["parent_index"] == 0
    assert tool["arguments"] == {"expression": "6*7"}
    assert tool["output"]["result"] == 42
    assert model["arguments"] is None and model["model_route"] == "scripted:demo"
    assert model["input_tokens"] > 0 and model["output_tokens"] > 0
    assert all(s["attempts"] == 1 and s["latency_ms"] is not None for s in steps)
    assert answer["output"] is not None
    assert (
        client_a.get(run_url(run_id)).json()["result"]
        == 'Result: {"expression": "6*7", "result": 42}'
    )


def test_cancel_answers_202_then_409_once_finished(client_a, agent):
    run_id = submit(client_a).json()["id"]

    response = client_a.post(run_url(run_id, "cancel/"))

    assert response.status_code == 202
    body = response.json()
    assert set(body) == RUN_FIELDS
    assert body["status"] == "cancelled" and body["error"]["code"] == "cancelled"
    assert body["finished_at"]
    assert Run.objects.get(pk=run_id).status == Run.Status.CANCELLED
    error = assert_error(client_a.post(run_url(run_id, "cancel/")), 409, "run_already_finished")
    assert "cancelled" in error["message"]


def test_cancelling_a_succeeded_run_answers_409(client_a, agent):
    run_id = submit(client_a).json()["id"]
    drive(run_id)

    error = assert_error(client_a.post(run_url(run_id, "cancel/")), 409, "run_already_finished")

    assert "succeeded" in error["message"]
    assert Run.objects.get(pk=run_id).status == Run.Status.SUCCEEDED


def test_cancel_is_post_only(client_a, agent):
    run_id = submit(client_a).json()["id"]
    assert_error(client_a.get(run_url(run_id, "cancel/")), 405, "method_not_allowed")
    assert Run.objects.get(pk=run_id).status == Run.Status.QUEUED


def test_events_page_lists_events_in_order_and_filters_after(client_a, agent):
    run_id = submit(client_a).json()["id"]

    first = client_a.get(run_url(run_id, "events/"))
    assert first.status_code == 200
    page = first.json()
    assert set(page) == {"events", "run_status", "finished", "last_event_id"}
    assert [e["type"] for e in page["events"]] == ["run.submitted"]
    assert page["run_status"] == "queued" and page["finished"] is False
    submitted = page["events"][0]
    assert set(submitted) == {"id", "type", "created_at", "step", "data"}
    assert page["last_event_id"] == submitted["id"]
    assert submitted["data"]["agent"] == "helper"

    drive(run_id)
    rest = client_a.get(run_url(run_id, "events/"), {"after": submitted["id"]}).json()

    types = [e["type"] for e in rest["events"]]
    assert types[0] == "run.started" and types[-1] == "run.succeeded"
    assert "run.submitted" not in types
    event_ids = [e["id"] for e in rest["events"]]
    assert event_ids == sorted(event_ids) and event_ids[0] > submitted["id"]
    assert rest["run_status"] == "succeeded" and rest["finished"] is True
    assert rest["last_event_id"] == event_ids[-1]
    everything = client_a.get(run_url(run_id, "events/")).json()
    assert [e["id"] for e in everything["events"]] == [submitted["id"], *event_ids]
    assert [e["id"] for e in everything["events"]] == list(
        AuditEvent.objects.filter(run_id=run_id).order_by("id").values_list("id", flat=True)
    )

    empty = client_a.get(run_url(run_id, "events/"), {"after": event_ids[-1]}).json()
    assert empty["events"] == [] and empty["finished"] is True
    assert empty["last_event_id"] == event_ids[-1]


@pytest.mark.parametrize("after", ["abc", "-1", "1.5"])
def test_events_with_a_bad_after_answer_400_naming_it(client_a, agent, after):
    run_id = submit(client_a).json()["id"]
    error = assert_error(
        client_a.get(run_url(run_id, "events/"), {"after": after}), 400, "invalid", field="after"
    )
    assert "after" in error["message"]


def test_events_stream_sends_every_event_and_ends_with_the_run(client_a, agent):
    run_id = submit(client_a).json()["id"]
    drive(run_id)
    events = list(AuditEvent.objects.filter(run_id=run_id).order_by("id"))

    response = client_a.get(run_url(run_id, "events/"), HTTP_ACCEPT="text/event-stream")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    text = read_stream(response)
    assert [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")] == [
        e.id for e in events
    ]
    assert text.rstrip().endswith('event: end\ndata: {"run_status": "succeeded"}')

    resumed = client_a.get(
        run_url(run_id, "events/"),
        HTTP_ACCEPT="text/event-stream",
        HTTP_LAST_EVENT_ID=str(events[-2].id),
    )
    text = read_stream(resumed)
    assert [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")] == [
        events[-1].id
    ]


def test_events_stream_with_a_bad_last_event_id_answers_400(client_a, agent):
    run_id = submit(client_a).json()["id"]
    response = client_a.get(
        run_url(run_id, "events/"), HTTP_ACCEPT="text/event-stream", HTTP_LAST_EVENT_ID="x"
    )
    assert_error(response, 400, "invalid", field="after")


def test_events_page_without_credentials_answers_401(client_a, agent):
    run_id = submit(client_a).json()["id"]
    client_a.credentials()
    response = client_a.get(run_url(run_id, "events/"))
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Bearer"


def test_events_stream_without_credentials_answers_401(client_a, agent):
    run_id = submit(client_a).json()["id"]
    client_a.credentials()
    response = client_a.get(run_url(run_id, "events/"), HTTP_ACCEPT="text/event-stream")
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Bearer"


# --- idempotency --------------------------------------------------------------------------------


def test_the_same_idempotency_key_and_body_return_the_same_run(client_a, agent):
    body = {"agent": "helper", "input": {"a": 1, "b": 2}, "metadata": {"x": "y"}}
    first = post_run(client_a, body, HTTP_IDEMPOTENCY_KEY="order-17")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first

    reordered = {"metadata": {"x": "y"}, "input": {"b": 2, "a": 1}, "agent": "helper"}
    second = post_run(client_a, reordered, HTTP_IDEMPOTENCY_KEY="order-17")

    assert second.status_code == 202
    assert second["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    assert second["Location"] == first["Location"]
    assert Run.objects.count() == 1
    assert Run.objects.get().idempotency_key == "order-17"


def test_the_same_idempotency_key_with_another_body_answers_409(client_a, agent):
    post_run(client_a, {"agent": "helper", "input": "one"}, HTTP_IDEMPOTENCY_KEY="k-1")

    response = post_run(client_a, {"agent": "helper", "input": "two"}, HTTP_IDEMPOTENCY_KEY="k-1")

    error = assert_error(response, 409, "idempotency_conflict")
    assert "Idempotency-Key" in error["message"]
    assert Run.objects.count() == 1


def test_an_idempotency_key_is_scoped_to_its_user(client_a, client_b, agent):
    body = {"agent": "helper", "input": "same"}
    a = post_run(client_a, body, HTTP_IDEMPOTENCY_KEY="shared")
    b = post_run(client_b, body, HTTP_IDEMPOTENCY_KEY="shared")
    b_other = post_run(client_b, {"agent": "helper", "input": "x"}, HTTP_IDEMPOTENCY_KEY="k2")

    assert a.status_code == b.status_code == b_other.status_code == 202
    assert "Idempotent-Replayed" not in b
    assert a.json()["id"] != b.json()["id"]
    assert Run.objects.get(pk=b.json()["id"]).owner == client_b.user
    assert Run.objects.count() == 3


def test_without_an_idempotency_key_every_submission_is_a_new_run(client_a, agent):
    body = {"agent": "helper", "input": "same"}
    assert post_run(client_a, body).json()["id"] != post_run(client_a, body).json()["id"]
    assert Run.objects.count() == 2


def test_an_overlong_idempotency_key_answers_400(client_a, agent):
    response = post_run(client_a, {"agent": "helper", "input": "x"}, HTTP_IDEMPOTENCY_KEY="k" * 201)
    error = assert_error(response, 400, "invalid_input", field="idempotency_key")
    assert "Idempotency-Key" in error["message"]
    assert not Run.objects.exists()


# --- object-level access ------------------------------------------------------------------------


def test_another_users_run_answers_404_everywhere_and_is_not_listed(client_a, client_b, agent):
    run_id = submit(client_a).json()["id"]
    submit(client_b, input="mine")

    assert_error(client_b.get(run_url(run_id)), 404, "not_found")
    assert_error(client_b.get(run_url(run_id, "steps/")), 404, "not_found")
    assert_error(client_b.post(run_url(run_id, "cancel/")), 404, "not_found")
    assert_error(client_b.get(run_url(run_id, "events/")), 404, "not_found")
    assert_error(
        client_b.get(run_url(run_id, "events/"), HTTP_ACCEPT="text/event-stream"),
        404,
        "not_found",
    )
    listed = client_b.get(RUNS).json()
    assert listed["count"] == 1 and run_id not in {r["id"] for r in listed["results"]}
    assert Run.objects.get(pk=run_id).status == Run.Status.QUEUED  # the cancel did nothing
    assert client_a.get(run_url(run_id)).status_code == 200


# --- validation ---------------------------------------------------------------------------------


def test_server_owned_fields_in_the_body_answer_400_naming_them(client_a, agent):
    body = {
        "agent": "helper",
        "input": "x",
        "status": "succeeded",
        "owner": 1,
        "result": "forged",
        "usage": {"cost": "0"},
        "id": str(uuid.uuid4()),
    }

    error = assert_error(post_run(client_a, body), 400, "invalid")

    assert set(error["fields"]) == {"status", "owner", "result", "usage", "id"}
    assert error["fields"]["status"] == ["Unknown field; it cannot be set by a client."]
    assert error["message"].split(":")[0] in {"status", "owner", "result", "usage", "id"}
    assert not Run.objects.exists()


def test_unknown_fields_are_named_alongside_other_errors(client_a, agent):
    error = assert_error(post_run(client_a, {"input": "x", "status": "queued"}), 400, "invalid")
    assert set(error["fields"]) == {"agent", "status"}


def test_malformed_json_answers_400(client_a, agent):
    response = client_a.post(RUNS, '{"agent": "helper", "input": ', content_type="application/json")
    error = assert_error(response, 400, "parse_error")
    assert "JSON" in error["message"]
    assert not Run.objects.exists()


@pytest.mark.parametrize("raw", ["[]", "null", '"text"', "42"])
def test_a_body_that_is_not_an_object_answers_400(client_a, agent, raw):
    response = client_a.post(RUNS, raw, content_type="application/json")
    assert_error(response, 400, "invalid")
    assert not Run.objects.exists()


def test_a_body_that_is_not_json_answers_415(client_a, agent):
    response = client_a.post(RUNS, "agent=helper&input=x", content_type="text/plain")
    error = assert_error(response, 415, "unsupported_media_type")
    assert "text/plain" in error["message"]


def test_missing_fields_answer_400_naming_them(client_a, agent):
    error = assert_error(post_run(client_a, {}), 400, "invalid")
    assert set(error["fields"]) == {"agent", "input"}
    assert "required" in error["message"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"agent": "helper", "input": ["a", "b"]}, "input", "string or a JSON object"),
        ({"agent": "helper", "input": 42}, "input", "string or a JSON object"),
        ({"agent": "helper", "input": True}, "input", "string or a JSON object"),
        ({"agent": "helper", "input": ""}, "input", "empty"),
        ({"agent": "helper", "input": "   "}, "input", "empty"),
        ({"agent": "helper", "input": None}, "input", "null"),
        ({"agent": "helper", "input": "x", "metadata": ["a"]}, "metadata", "dictionary"),
        ({"agent": "helper", "input": "x", "metadata": "tag"}, "metadata", "dictionary"),
        ({"agent": "Not a slug!", "input": "x"}, "agent", "slug"),
        ({"agent": ["helper"], "input": "x"}, "agent", "slug"),
        ({"agent": "helper", "input": "x", "session": ""}, "session", "blank"),
        ({"agent": "helper", "input": "x", "session": "s" * 201}, "session", "200"),
        ({"agent": "helper", "input": "x", "session": "a\u0000b"}, "session", "Null characters"),
        ({"agent": "helper", "input": "x", "on_conflict": "wait"}, "on_conflict", "valid choice"),
        ({"agent": "helper", "input": "x", "webhook_url": "not a url"}, "webhook_url", "URL"),
    ],
)
def test_wrong_types_answer_400_naming_the_field(client_a, agent, body, field, words):
    error = assert_error(post_run(client_a, body), 400, "invalid", field=field)
    assert error["message"].startswith(f"{field}:")
    assert words in error["message"]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"agent": "helper", "input": "a\u0000b"}, "input"),
        ({"agent": "helper", "input": {"text": "a\u0000b"}}, "input"),
        ({"agent": "helper", "input": {"a\u0000b": "text"}}, "input"),
        ({"agent": "helper", "input": "x", "metadata": {"tag": "a\u0000b"}}, "metadata"),
    ],
)
def test_a_nul_character_in_input_or_metadata_answers_400_not_500(client_a, agent, body, field):
    response = post_run(client_a, body)
    assert response.status_code == 400, response.content
    assert_error(response, 400, field=field)
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"agent": "helper", "input": ' + nested(400) + "}", "input"),
        ('{"agent": "helper", "input": "x", "metadata": ' + nested(400) + "}", "metadata"),
        ('{"agent": "helper", "input": {"a": ' + nested(100_000, "", "array") + "}}", "input"),
        ('{"agent": "helper", "input": ' + nested(65) + "}", "input"),
        ('{"agent": "helper", "input": "x", "budget": ' + nested(65) + "}", "budget"),
        # Unclosed: refused for its depth before any parser recurses into it.
        ('{"input": "x", "agent": "helper", "metadata": ' + "[" * 100_000, "metadata"),
        ('{"agent": "helper", "input": {"a": "[[[[", "b": ' + nested(65) + "}}", "input"),
    ],
)
def test_json_nested_too_deeply_answers_400_naming_the_field(client_a, agent, raw, field):
    response = client_a.post(RUNS, raw, content_type="application/json")

    error = assert_error(response, 400, "invalid", field=field)
    assert error["message"] == f"{field}: Nested more than 64 levels deep (arrays and objects)."
    assert not Run.objects.exists()


def test_a_body_nested_too_deeply_outside_any_field_answers_400(client_a, agent):
    response = client_a.post(RUNS, nested(100_000, "", "array"), content_type="application/json")

    error = assert_error(response, 400, "invalid", field="non_field_errors")
    assert "64 levels" in error["message"]


def test_json_nested_to_the_limit_is_accepted_and_returned_as_sent(client_a, agent):
    value = json.loads(nested(64))
    # Brackets in strings are text, not nesting.
    metadata = {"m": json.loads(nested(63)), "text": "[{" * 1000}
    body = {"agent": "helper", "input": value, "metadata": metadata}

    response = client_a.post(RUNS, json.dumps(body), content_type="application/json")

    assert response.status_code == 202, response.content[:500]
    run = Run.objects.get()
    assert run.input == value and response.json()["input"] == value
    assert client_a.get(f"{RUNS}{run.pk}/").json()["metadata"] == body["metadata"]


def test_the_depth_limit_is_a_setting(client_a, agent, settings):
    settings.AGENTSITE_MAX_JSON_DEPTH = 3
    ok = {"agent": "helper", "input": json.loads(nested(3))}
    assert post_run(client_a, ok).status_code == 202

    too_deep = {"agent": "helper", "input": json.loads(nested(4))}
    error = assert_error(post_run(client_a, too_deep), 400, "invalid", field="input")
    assert "3 levels" in error["message"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (r'{"agent": "helper", "input": "a\ud800b"}', "input"),
        (r'{"agent": "helper", "input": {"text": ["x", {"y": "\udfff"}]}}', "input"),
        (r'{"agent": "helper", "input": {"a\ud800": "text"}}', "input"),
        (r'{"agent": "helper", "input": "x", "metadata": {"tag": "\uDC00"}}', "metadata"),
        (r'{"agent": "helper", "input": "x", "metadata": {"\ud83d": 1}}', "metadata"),
        (r'{"agent": "helper", "input": "x", "on_conflict": "\ud800"}', "on_conflict"),
        (r'{"agent": "helper", "input": "x", "\ud800": 1}', "\\ud800"),
        # The high half of a pair alone, then the low half alone.
        (r'{"agent": "helper", "input": "\ude00\ud83d"}', "input"),
    ],
)
def test_a_lone_surrogate_answers_400_naming_the_field(client_a, agent, raw, field):
    response = client_a.post(RUNS, raw, content_type="application/json")

    error = assert_error(response, 400, "invalid", field=field)
    assert "Surrogate characters are not allowed: U+D" in error["message"]
    assert error["message"].startswith(f"{field}: ")
    assert not Run.objects.exists()


def test_a_surrogate_pair_is_a_character_and_is_accepted(client_a, agent):
    raw = json.dumps({"agent": "helper", "input": {"q": "smile 😀"}, "metadata": {"e": "😀"}})
    assert r"\ud83d\ude00" in raw  # sent as an escaped surrogate pair

    response = client_a.post(RUNS, raw, content_type="application/json")

    assert response.status_code == 202, response.content
    run = Run.objects.get()
    assert run.input == {"q": "smile 😀"} and run.metadata == {"e": "😀"}


def test_oversized_metadata_answers_400(client_a, agent):
    body = {"agent": "helper", "input": "x", "metadata": {"blob": "m" * 17_000}}
    error = assert_error(post_run(client_a, body), 400, "invalid", field="metadata")
    assert "bytes" in error["message"]


def test_oversized_input_within_the_request_limit_answers_400(client_a, agent):
    body = {"agent": "helper", "input": "i" * (300 * 1024)}
    error = assert_error(post_run(client_a, body), 400, "invalid_input", field="input")
    assert "input is" in error["message"] and "limit" in error["message"]
    assert not Run.objects.exists()


def test_an_unknown_agent_answers_400_naming_the_field(client_a, agent):
    error = assert_error(
        post_run(client_a, {"agent": "nobody", "input": "x"}), 400, "agent_not_found", field="agent"
    )
    assert "nobody" in error["message"]


def test_a_disabled_agent_answers_400(client_a, agent):
    agent.is_active = False
    agent.save()

    error = assert_error(
        post_run(client_a, {"agent": "helper", "input": "x"}),
        400,
        "agent_unavailable",
        field="agent",
    )
    assert "helper" in error["message"] and "disabled" in error["message"]
    assert not Run.objects.exists()


# --- request size -------------------------------------------------------------------------------


def test_a_body_over_the_limit_answers_413_before_parsing(client_a, agent, settings):
    settings.AGENTSITE_MAX_REQUEST_BYTES = 1000
    # Not even JSON: the 413 must come before any parser reads it.
    response = client_a.post(RUNS, "{" + "x" * 1000, content_type="application/json")

    error = assert_error(response, 413, "request_too_large")
    assert "1000 bytes" in error["message"]
    assert not Run.objects.exists()


def test_a_body_at_the_limit_is_parsed(client_a, agent, settings):
    raw = json.dumps({"agent": "helper", "input": "x"})
    settings.AGENTSITE_MAX_REQUEST_BYTES = len(raw)
    response = client_a.post(RUNS, raw, content_type="application/json")
    assert response.status_code == 202


def test_a_non_numeric_content_length_answers_400(client_a, agent):
    response = client_a.post(RUNS, "{}", content_type="application/json", CONTENT_LENGTH="lots")
    error = assert_error(response, 400, "bad_request")
    assert "Content-Length" in error["message"]


def asgi_post(path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """POST through Django's ASGI handler with no Content-Length (a chunked upload)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 12345),
        "headers": [(b"host", b"testserver"), *headers],
        "_body_file": FakePayload(body),
    }
    response = async_to_sync(AsyncClientHandler())(scope)
    return response.status_code, response.content


def test_a_chunked_body_over_the_limit_answers_413(client_a, agent, settings):
    settings.AGENTSITE_MAX_REQUEST_BYTES = 1000
    body = json.dumps({"agent": "helper", "input": "x" * 2000}).encode()
    headers = [
        (b"authorization", f"Bearer {client_a.plain_key}".encode()),
        (b"content-type", b"application/json"),
        (b"transfer-encoding", b"chunked"),
    ]

    status, content = asgi_post(RUNS, body, headers)

    assert status == 413, content
    assert json.loads(content)["error"]["code"] == "request_too_large"
    assert not Run.objects.exists()


def test_a_chunked_body_under_the_limit_is_accepted(client_a, agent):
    body = json.dumps({"agent": "helper", "input": "x"}).encode()
    headers = [
        (b"authorization", f"Bearer {client_a.plain_key}".encode()),
        (b"content-type", b"application/json"),
        (b"transfer-encoding", b"chunked"),
    ]

    status, content = asgi_post(RUNS, body, headers)

    assert status == 202, content
    assert Run.objects.count() == 1


# --- sessions -----------------------------------------------------------------------------------


def test_runs_naming_the_same_session_share_it(client_a, agent):
    first = submit(client_a, session="conv-1").json()
    drive(first["id"])
    second = submit(client_a, session="conv-1").json()

    assert first["session"] == second["session"] == "conv-1"
    session = Session.objects.get()
    assert session.key == "conv-1" and session.owner == client_a.user and session.agent == agent
    assert set(session.runs.values_list("id", flat=True)) == {
        uuid.UUID(first["id"]),
        uuid.UUID(second["id"]),
    }


def test_an_enqueued_run_waits_for_the_earlier_run_of_its_session(client_a, agent):
    from agents import engine

    first = submit(client_a, session="conv", input="first").json()["id"]
    second = submit(client_a, session="conv", input="second").json()["id"]

    engine.advance(second)  # a worker picks up the later run first: it must wait its turn
    assert client_a.get(run_url(second)).json()["status"] == "queued"
    assert client_a.get(run_url(second, "steps/")).json() == []

    assert drive(first).status == Run.Status.SUCCEEDED
    assert drive(second).status == Run.Status.SUCCEEDED
    runs = {r["id"]: r for r in client_a.get(RUNS, {"status": "succeeded"}).json()["results"]}
    finished = datetime.fromisoformat(runs[first]["finished_at"])
    assert finished <= datetime.fromisoformat(runs[second]["started_at"])


def test_the_same_session_key_of_two_users_is_two_sessions(client_a, client_b, agent):
    submit(client_a, session="conv")
    submit(client_b, session="conv")

    assert Session.objects.filter(key="conv").count() == 2


def test_reject_on_a_busy_session_answers_409_and_enqueue_is_accepted(client_a, agent):
    busy = submit(client_a, session="conv", on_conflict="reject").json()
    assert busy["status"] == "queued"

    response = post_run(
        client_a, {"agent": "helper", "input": "again", "session": "conv", "on_conflict": "reject"}
    )
    error = assert_error(response, 409, "session_busy", field="session")
    assert "conv" in error["message"]
    assert Run.objects.count() == 1

    queued = submit(client_a, session="conv")  # on_conflict defaults to enqueue
    assert queued.json()["session"] == "conv" and Run.objects.count() == 2


def test_reject_on_an_idle_session_is_accepted(client_a, agent):
    drive(submit(client_a, session="conv").json()["id"])
    response = submit(client_a, session="conv", on_conflict="reject")
    assert response.json()["session"] == "conv"


def test_a_session_key_used_with_another_agent_answers_400(client_a, agent, make_agent):
    make_agent(slug="other", script=[{"text": "ok"}])
    submit(client_a, session="conv")

    response = post_run(client_a, {"agent": "other", "input": "x", "session": "conv"})

    error = assert_error(response, 400, "invalid_input", field="session")
    assert "another agent" in error["message"]
    assert Run.objects.count() == 1


# --- webhooks -----------------------------------------------------------------------------------

HOOK = "https://hooks.example.com/agentsite"
PUBLIC_ADDRESS = "93.184.215.14"  # what `fake_dns` resolves the tests' receivers to: never sent to


def test_a_webhook_when_webhooks_are_disabled_answers_400(client_a, agent, settings):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = []
    response = post_run(
        client_a, {"agent": "helper", "input": "x", "webhook_url": "https://hooks.example.com/"}
    )
    error = assert_error(response, 400, "invalid_input", field="webhook_url")
    assert "webhooks are disabled" in error["message"]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/agentsite",
        "https://hooks.example.com:443/default-port",
        "http://hooks.example.com/plain",
        "https://HOOKS.example.com/upper",
        "https://example.org/root",
        "https://a.b.example.org/deep",
        "http://hooks.example.net:8080/x?y=1",
        "https://a.example.io:9443/any-port",
    ],
)
def test_webhooks_to_allowed_hosts_are_accepted(client_a, agent, settings, fake_dns, url):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = [
        "hooks.example.com",
        ".example.org",
        "hooks.example.net:8080",
        ".example.io:*",
    ]
    for name in ("hooks.example.com", "example.org", "a.b.example.org", "hooks.example.net"):
        fake_dns[name] = [PUBLIC_ADDRESS]
    fake_dns["a.example.io"] = [PUBLIC_ADDRESS, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]

    body = submit(client_a, webhook_url=url).json()

    assert body["webhook"] == {"url": url, "status": "pending", "attempts": 0}
    assert Run.objects.get().webhook_url == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://evil.example.net/", "not in the allowed list"),
        ("https://example.com/", "not in the allowed list"),
        ("https://hooks.example.com.evil.net/", "not in the allowed list"),
        ("https://evilexample.org/", "not in the allowed list"),
        ("http://127.0.0.1/", "not in the allowed list"),
        ("http://localhost:8000/", "not in the allowed list"),
        # A host listed without a port allows only the scheme's default port.
        ("http://hooks.example.com:6379/", "webhook port 6379 of host 'hooks.example.com'"),
        ("https://hooks.example.com:80/", "webhook port 80 of host 'hooks.example.com'"),
        ("https://hooks.example.com:99999/", "not a valid URL"),
        ("ftp://hooks.example.com/file", "http(s)"),
        ("https://user:secret@hooks.example.com/", "credentials"),
        ("https://user@hooks.example.com/", "credentials"),
    ],
)
def test_webhooks_to_other_hosts_schemes_or_with_credentials_answer_400(
    client_a, agent, settings, url, words
):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com", ".example.org"]

    error = assert_error(
        post_run(client_a, {"agent": "helper", "input": "x", "webhook_url": url}),
        400,
        field="webhook_url",
    )

    assert words in error["message"]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("addresses", "words"),
    [
        (["10.0.0.7"], "'hooks.example.com' resolves to 10.0.0.7, a private address"),
        ([PUBLIC_ADDRESS, "127.0.0.1"], "resolves to 127.0.0.1, a loopback address"),
        (["169.254.169.254"], "resolves to 169.254.169.254, a link-local address"),
        (["::ffff:10.0.0.7"], "a private address"),
        ([], "'hooks.example.com' does not resolve to an address"),
    ],
)
def test_a_webhook_host_resolving_to_a_non_public_address_answers_400(
    client_a, agent, settings, fake_dns, addresses, words
):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    if addresses:
        fake_dns["hooks.example.com"] = addresses  # else it does not exist

    error = assert_error(
        post_run(client_a, {"agent": "helper", "input": "x", "webhook_url": HOOK}),
        400,
        field="webhook_url",
    )

    assert words in error["message"]
    assert not Run.objects.exists()


def test_a_webhook_address_in_an_allowed_network_is_accepted(client_a, agent, settings):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["10.0.0.7:8080"]
    url = "http://10.0.0.7:8080/hook"
    assert_error(post_run(client_a, {"agent": "helper", "input": "x", "webhook_url": url}), 400)
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = ["10.0.0.0/24"]
    assert submit(client_a, webhook_url=url).json()["webhook"]["url"] == url


def test_a_dns_server_failing_at_submission_is_no_reason_to_refuse_a_webhook(
    client_a, agent, settings, monkeypatch
):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]

    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(outbound, "resolver", failing)
    assert submit(client_a, webhook_url=HOOK).json()["webhook"]["status"] == "pending"


@pytest.mark.parametrize("url", ["javascript:alert(1)", "file:///etc/passwd", "gopher://x.org/"])
def test_webhooks_with_non_http_schemes_answer_400(client_a, agent, settings, url):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com", ".example.org", "x.org"]
    assert_error(
        post_run(client_a, {"agent": "helper", "input": "x", "webhook_url": url}),
        400,
        field="webhook_url",
    )
    assert not Run.objects.exists()


# --- limits -------------------------------------------------------------------------------------


def test_the_per_key_cap_on_active_runs_answers_429(client_a, agent, settings):
    settings.AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY = 2
    first = submit(client_a).json()["id"]
    submit(client_a)

    response = post_run(client_a, {"agent": "helper", "input": "third"})

    error = assert_error(response, 429, "too_many_active_runs")
    assert int(response["Retry-After"]) >= 1
    assert "2 runs not yet finished" in error["message"] and "limit is 2" in error["message"]
    assert Run.objects.count() == 2
    assert AuditEvent.objects.filter(action="run.submitted").count() == 2

    drive(first)
    assert submit(client_a, input="after one finished").status_code == 202
    assert Run.objects.count() == 3


def test_the_per_key_cap_counts_each_key_separately(client_a, make_client, agent, settings):
    settings.AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY = 1
    submit(client_a)
    second_key = make_client(user=client_a.user)

    assert submit(second_key).status_code == 202
    assert_error(post_run(client_a, {"agent": "helper", "input": "x"}), 429)


def test_an_idempotent_replay_is_not_refused_by_the_cap(client_a, agent, settings):
    settings.AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY = 1
    body = {"agent": "helper", "input": "x"}
    first = post_run(client_a, body, HTTP_IDEMPOTENCY_KEY="k")

    replay = post_run(client_a, body, HTTP_IDEMPOTENCY_KEY="k")

    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]


def test_the_request_rate_limit_answers_429_with_retry_after(make_client, agent, settings):
    settings.AGENTSITE_API_RATE_LIMIT = "3/minute"
    assert settings.REDIS_URL, "the rate limit counts in Redis: run with `make test`"
    client = make_client()
    other = make_client()

    for _ in range(3):
        assert client.get(RUNS).status_code == 200

    response = client.get(RUNS)

    error = assert_error(response, 429, "throttled")
    assert int(response["Retry-After"]) >= 1
    assert "throttled" in error["message"].lower()
    assert_error(post_run(client, {"agent": "helper", "input": "x"}), 429, "throttled")
    assert not Run.objects.exists()
    assert other.get(RUNS).status_code == 200  # another key has its own bucket
    counter = redis.Redis.from_url(settings.REDIS_URL)
    bucket = rediskeys.key(f"rate:key:{client.api_key.prefix}")
    assert int(counter.get(bucket)) == 5
    assert 0 < counter.pttl(bucket) <= 60_000


def test_the_request_rate_limit_also_covers_event_streams(make_client, agent, settings):
    settings.AGENTSITE_API_RATE_LIMIT = "3/minute"
    client = make_client()
    run_id = submit(client).json()["id"]
    client.post(run_url(run_id, "cancel/"))  # a finished run: its stream ends at once
    assert client.get(RUNS).status_code == 200

    assert_error(client.get(RUNS), 429, "throttled")
    response = client.get(run_url(run_id, "events/"), HTTP_ACCEPT="text/event-stream")

    assert response.status_code == 429


@pytest.mark.django_db(transaction=True)
def test_a_worker_planning_a_step_does_not_block_submissions_of_the_agent(
    make_client, make_agent, monkeypatch
):
    from agents import dispatch, engine

    monkeypatch.setattr(dispatch, "_send", lambda *args, **kwargs: None)  # publish nothing
    make_agent(slug="helper", script=[{"text": "Hello, {input}!"}])
    make_agent(slug="other", script=[{"text": "ok"}])
    client = make_client()
    first = submit(client, input="first").json()["id"]  # committed: this test is transactional
    planned, release = threading.Event(), threading.Event()

    def worker() -> None:  # what a worker's advance_run does, holding its transaction open
        try:
            with transaction.atomic():
                engine.plan(first)
                planned.set()
                release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert planned.wait(10)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
        control = post_run(client, {"agent": "other", "input": "x"})
        response = post_run(client, {"agent": "helper", "input": "second"})
    finally:
        release.set()
        thread.join(10)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = 0")

    assert control.status_code == 202  # another agent's version is not locked
    assert response.status_code == 202, response.content
