"""The REST API over real HTTP: uvicorn serving the ASGI app, a real Celery worker, Redis, Postgres.

Submit → follow the Server-Sent Events stream → succeeded; resume with Last-Event-ID; JSON
polling with ``?after=``; idempotent resubmission; cancel; another key's caller gets 404; signed
webhooks delivered with a retry. Nothing here calls the views in-process.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import OperationalError

from agents import webhooks
from agents.models import Run
from agents.services import create_api_key
from harness.polling import poll

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

FINAL = {"succeeded", "failed", "cancelled"}
STREAM_TIMEOUT = httpx.Timeout(10.0, read=30.0)


# --- Helpers ----------------------------------------------------------------------------------


def api_client(api_server: Any, username: str) -> httpx.Client:
    """An HTTP client authenticated with a new API key of a new user."""
    user = User.objects.create_user(username=username)
    _, plain = create_api_key(user=user, name="http tests")
    return httpx.Client(
        base_url=api_server.base_url,
        headers={"Authorization": f"Bearer {plain}"},
        timeout=10.0,
    )


def settle(timeout: float = 15.0) -> None:
    """Let the worker finish what the test started, so the database is not flushed under it;
    runs still unfinished after ``timeout`` are marked cancelled (the worker then drops them)."""
    try:
        poll(
            lambda: not Run.objects.filter(status__in=Run.ACTIVE_STATUSES).exists(),
            timeout=timeout,
            interval=0.1,
        )
    except AssertionError:
        for _ in range(5):
            try:
                Run.objects.filter(status__in=Run.ACTIVE_STATUSES).update(status="cancelled")
                break
            except OperationalError:  # a deadlock with the worker: try again
                time.sleep(0.2)
        time.sleep(0.5)


@pytest.fixture
def client(api_server: Any, celery_worker: Any) -> Iterator[httpx.Client]:
    call_command("seed_demo", stdout=io.StringIO())
    with api_client(api_server, f"alice-{uuid.uuid4().hex[:6]}") as c:
        yield c
    settle()


@pytest.fixture
def other_client(api_server: Any) -> Iterator[httpx.Client]:
    with api_client(api_server, f"mallory-{uuid.uuid4().hex[:6]}") as c:
        yield c


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("agent", "support-assistant")
    body.setdefault("input", "how do I get a refund?")
    response = client.post("/api/v1/runs/", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_final(client: httpx.Client, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        run = client.get(f"/api/v1/runs/{run_id}/").json()
        return run if run["status"] in FINAL else None

    return poll(final, timeout=timeout, interval=0.1, what=f"run {run_id} to finish")


@dataclass
class Frame:
    id: int | None
    event: str
    data: Any


def sse_frames(response: httpx.Response) -> Iterator[Frame]:
    """Parse a text/event-stream body into frames (comments and retry-only frames skipped)."""
    fields: dict[str, list[str]] = {}
    for line in response.iter_lines():
        if line == "":
            if "event" in fields or "data" in fields:
                raw_id = fields.get("id", [None])[-1]
                data = "\n".join(fields.get("data", []))
                yield Frame(
                    id=int(raw_id) if raw_id is not None else None,
                    event=fields.get("event", ["message"])[-1],
                    data=json.loads(data) if data else None,
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


def follow(
    client: httpx.Client, run_id: str, headers: dict[str, str] | None = None, deadline: float = 60
) -> list[Frame]:
    """Every frame of the run's event stream up to and including ``end``."""
    frames: list[Frame] = []
    stop = time.monotonic() + deadline
    with client.stream(
        "GET",
        f"/api/v1/runs/{run_id}/events/",
        headers={"Accept": "text/event-stream", **(headers or {})},
        timeout=STREAM_TIMEOUT,
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for frame in sse_frames(response):
            frames.append(frame)
            if frame.event == "end":
                return frames
            assert time.monotonic() < stop, f"the stream did not end in {deadline}s: {frames}"
    raise AssertionError(f"the stream closed without an end event: {frames}")


def slow_agent(fake_openai: Any, make_agent: Any, latency_ms: int = 2000) -> str:
    model = f"slow-{uuid.uuid4().hex[:8]}"
    fake_openai.configure(model=model, latency_ms=latency_ms)
    return make_agent(model_route=f"fake:{model}").slug


def assert_in_order(types: list[str], expected: list[str]) -> None:
    positions = []
    for name in expected:
        assert name in types, f"{name} missing from {types}"
        positions.append(types.index(name))
    assert positions == sorted(positions), f"{expected} out of order in {types}"


# --- Submit, stream, resume, poll -------------------------------------------------------------


def test_submit_then_the_event_stream_follows_the_run_to_success(client):
    created = submit(client)
    run_id = created["id"]
    assert created["status"] == "queued"
    assert created["links"]["events"] == f"/api/v1/runs/{run_id}/events/"

    frames = follow(client, run_id)

    assert frames[-1].event == "end" and frames[-1].data == {"run_status": "succeeded"}
    events = frames[:-1]
    types = [f.event for f in events]
    assert_in_order(
        types, ["run.started", "step.succeeded", "tool_call.succeeded", "run.succeeded"]
    )
    assert types[-1] == "run.succeeded"
    ids = [f.id for f in events]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    for frame in events:  # the data is the event's JSON, naming itself
        assert frame.data["id"] == frame.id and frame.data["type"] == frame.event

    run = client.get(f"/api/v1/runs/{run_id}/").json()
    assert run["status"] == "succeeded"
    assert "Refund policy" in run["result"]
    assert run["error"] is None and run["finished_at"]

    steps = client.get(f"/api/v1/runs/{run_id}/steps/").json()
    assert [(s["kind"], s["status"]) for s in steps] == [
        ("model", "succeeded"),
        ("tool", "succeeded"),
        ("model", "succeeded"),
    ]
    assert steps[1]["tool_name"] == "knowledge_search"


def test_reconnecting_with_last_event_id_resumes_after_it(client):
    run_id = submit(client)["id"]
    everything = [f for f in follow(client, run_id) if f.event != "end"]
    assert len(everything) >= 4
    resume_after = everything[1].id

    resumed = follow(client, run_id, headers={"Last-Event-ID": str(resume_after)})

    assert resumed[-1].event == "end"
    assert [f.id for f in resumed[:-1]] == [f.id for f in everything[2:]]
    assert all(f.id > resume_after for f in resumed[:-1])


def test_json_polling_with_after_pages_through_the_events(client):
    run_id = submit(client)["id"]
    seen: list[dict[str, Any]] = []
    after: int | None = None

    def poll_once() -> bool:
        nonlocal after
        params = {"after": after} if after is not None else {}
        response = client.get(f"/api/v1/runs/{run_id}/events/", params=params)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        page = response.json()
        seen.extend(page["events"])
        if page["events"]:
            assert page["last_event_id"] == page["events"][-1]["id"]
        after = page["last_event_id"]
        return page["finished"]

    poll(poll_once, timeout=60, interval=0.1, what="the event page to say finished")

    ids = [e["id"] for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids  # nothing twice, in order
    assert seen[-1]["type"] == "run.succeeded"
    everything = client.get(f"/api/v1/runs/{run_id}/events/").json()["events"]
    assert [e["id"] for e in everything] == ids
    tail = client.get(f"/api/v1/runs/{run_id}/events/", params={"after": ids[2]}).json()
    assert [e["id"] for e in tail["events"]] == ids[3:]
    assert tail["finished"] is True and tail["run_status"] == "succeeded"
    assert client.get(f"/api/v1/runs/{run_id}/events/", params={"after": "x"}).status_code == 400


# --- Idempotency, cancel, access --------------------------------------------------------------


def test_idempotent_resubmission_returns_the_same_run(client, other_client):
    key = f"idem-{uuid.uuid4().hex}"
    body = {"agent": "support-assistant", "input": "refund please", "metadata": {"n": 1}}

    first = client.post("/api/v1/runs/", json=body, headers={"Idempotency-Key": key})
    again = client.post("/api/v1/runs/", json=body, headers={"Idempotency-Key": key})
    other = client.post(
        "/api/v1/runs/", json={**body, "input": "something else"}, headers={"Idempotency-Key": key}
    )

    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] and "Idempotency-Key" in other.json()["error"]["message"]
    runs = client.get("/api/v1/runs/").json()
    assert [r["id"] for r in runs["results"]] == [first.json()["id"]]
    # Keys are per caller: another caller's same Idempotency-Key is another run.
    theirs = other_client.post("/api/v1/runs/", json=body, headers={"Idempotency-Key": key})
    assert theirs.status_code == 202, theirs.text
    assert theirs.json()["id"] != first.json()["id"]
    assert "Idempotent-Replayed" not in theirs.headers


def test_cancelling_a_slow_run_ends_it_cancelled_and_a_second_cancel_conflicts(
    client, fake_openai, make_agent
):
    run_id = submit(client, agent=slow_agent(fake_openai, make_agent))["id"]
    poll(
        lambda: client.get(f"/api/v1/runs/{run_id}/").json()["status"] == "running",
        what="the run to start",
    )

    response = client.post(f"/api/v1/runs/{run_id}/cancel/")

    assert response.status_code == 202, response.text
    assert response.json()["status"] == "cancelled"
    frames = follow(client, run_id)
    assert frames[-1].data == {"run_status": "cancelled"}
    assert "run.cancelled" in [f.event for f in frames]
    time.sleep(2.5)  # the model call in flight finishes; its result must not revive the run
    run = client.get(f"/api/v1/runs/{run_id}/").json()
    assert run["status"] == "cancelled" and run["result"] is None
    assert run["error"]["code"] == "cancelled"

    again = client.post(f"/api/v1/runs/{run_id}/cancel/")
    assert again.status_code == 409, again.text
    assert set(again.json()["error"]) >= {"code", "message"}


def test_another_callers_key_gets_404_for_every_view_of_a_run(client, other_client):
    run_id = submit(client)["id"]
    base = f"/api/v1/runs/{run_id}/"

    assert other_client.get(base).status_code == 404
    assert other_client.get(base + "steps/").status_code == 404
    assert other_client.get(base + "events/").status_code == 404
    stream = other_client.get(base + "events/", headers={"Accept": "text/event-stream"})
    assert stream.status_code == 404, stream.text
    assert stream.json()["error"]["code"] == "not_found"
    assert other_client.post(base + "cancel/").status_code == 404
    assert other_client.get("/api/v1/runs/").json()["results"] == []
    # ... and the owner's run was not cancelled by that attempt
    assert wait_final(client, run_id)["status"] == "succeeded"

    anonymous = httpx.get(
        f"{client.base_url}{base}events/", headers={"Accept": "text/event-stream"}
    )
    assert anonymous.status_code == 401


def test_an_open_stream_does_not_block_other_requests(client, fake_openai, make_agent):
    agent = slow_agent(fake_openai, make_agent, latency_ms=3000)
    run_ids = []
    for _ in range(3):  # one at a time: see test_back_to_back_submissions_are_all_accepted
        run_ids.append(submit(client, agent=agent)["id"])
        poll(
            lambda: client.get(f"/api/v1/runs/{run_ids[-1]}/").json()["status"] == "running",
            what="the run to start",
        )
    with (
        client.stream(
            "GET",
            f"/api/v1/runs/{run_ids[0]}/events/",
            headers={"Accept": "text/event-stream"},
            timeout=STREAM_TIMEOUT,
        ) as s1,
        client.stream(
            "GET",
            f"/api/v1/runs/{run_ids[1]}/events/",
            headers={"Accept": "text/event-stream"},
            timeout=STREAM_TIMEOUT,
        ) as s2,
    ):
        frames = sse_frames(s1)
        first = next(frames)  # the stream is open and serving
        assert first.event == "run.submitted"
        assert s2.status_code == 200

        started = time.monotonic()
        health = httpx.get(f"{client.base_url}/healthz", timeout=5)
        other = client.get(f"/api/v1/runs/{run_ids[2]}/")
        elapsed = time.monotonic() - started

        assert health.status_code == 200 and other.status_code == 200
        assert elapsed < 1.0, f"requests took {elapsed:.2f}s while streams were open"
        assert client.get(f"/api/v1/runs/{run_ids[0]}/").json()["status"] not in FINAL
        rest = [f.event for f in frames]  # the stream still ends properly
        assert rest[-1] == "end"


# --- Webhooks ---------------------------------------------------------------------------------


@dataclass
class Receiver:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """An HTTP endpoint that answers 500 to its first request and 200 after, recording each."""
    recorded: list[dict[str, Any]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                recorded.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                status = 500 if len(recorded) == 1 else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/hook", requests=recorded)
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_is_retried_then_delivered_signed(client, receiver, webhook_secret):
    run_id = submit(client, webhook_url=receiver.url)["id"]

    poll(lambda: len(receiver.requests) >= 2, timeout=60, what="the webhook's second attempt")
    final = wait_final(client, run_id)
    run = poll(
        lambda: (
            (r := client.get(f"/api/v1/runs/{run_id}/").json())["webhook"]["status"] == "delivered"
            and r
        ),
        what="the webhook to be recorded as delivered",
    )

    assert run["webhook"] == {"url": receiver.url, "status": "delivered", "attempts": 2}
    assert len(receiver.requests) == 2
    delivered = receiver.requests[-1]
    assert delivered["path"] == "/hook"
    headers = delivered["headers"]
    assert headers["content-type"] == "application/json"
    signature = headers[webhooks.SIGNATURE_HEADER.lower()]
    assert webhooks.verify(delivered["body"], signature)
    assert not webhooks.verify(delivered["body"].replace(b"succeeded", b"failed"), signature)
    assert not webhooks.verify(delivered["body"] + b" ", signature)
    payload = json.loads(delivered["body"])
    assert payload["event"] == "run.finished"
    assert payload["run"]["id"] == run_id
    assert payload["run"]["status"] == "succeeded" == final["status"]
    assert payload["run"]["result"] == final["result"]
    first = receiver.requests[0]
    assert webhooks.verify(first["body"], first["headers"][webhooks.SIGNATURE_HEADER.lower()])


def test_a_webhook_host_outside_the_allowlist_is_refused(client):
    for url in ("http://example.com/hook", "http://169.254.169.254/latest/meta-data/"):
        response = client.post(
            "/api/v1/runs/",
            json={"agent": "support-assistant", "input": "hi", "webhook_url": url},
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "webhook_url" in error["fields"], error
    assert client.get("/api/v1/runs/").json()["results"] == []


# --- Application bugs shown over HTTP ---------------------------------------------------------


def test_a_nul_character_in_input_or_metadata_is_a_400_not_a_500(client):
    bodies = [
        {"agent": "support-assistant", "input": "refund\u0000please"},
        {"agent": "support-assistant", "input": {"text": "a\u0000b"}},
        {"agent": "support-assistant", "input": "hi", "metadata": {"tag": "a\u0000b"}},
    ]
    statuses = [client.post("/api/v1/runs/", json=body).status_code for body in bodies]
    assert statuses == [400, 400, 400]


def test_back_to_back_submissions_are_all_accepted(client):
    for i in range(16):  # what any client submitting a batch does
        response = client.post(
            "/api/v1/runs/", json={"agent": "support-assistant", "input": f"refund {i}"}
        )
        assert response.status_code == 202, f"submission {i}: {response.text}"


def test_the_event_stream_accepts_every_spelling_of_a_run_id(client):
    run_id = submit(client)["id"]
    wait_final(client, run_id)
    for spelling in (run_id.upper(), run_id.replace("-", "")):
        assert client.get(f"/api/v1/runs/{spelling}/").status_code == 200
        frames = follow(client, spelling)
        assert frames[-1].data == {"run_status": "succeeded"}
