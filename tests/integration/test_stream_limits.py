"""Limits that must hold across web processes, over real HTTP: two uvicorn processes on the test
database and Redis share each API key's cap of open event streams and each client address's
failed authentications. A stream's slot is given back when its client goes away, and the slots
of a process killed while streaming run out."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from agents import apikeys, streamslots
from agents.models import Agent, ApiKey, Run
from agents.services import create_api_key, submit_run
from agentsite import rediskeys
from harness.polling import poll
from harness.processes import stop_process
from tests.integration.test_api_http import STREAM_TIMEOUT, sse_frames
from tests.support.processes import ApiServer, start_api_server, uses_real_services

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CAP = 2
FAILURES = 4
METRICS_TOKEN = "scrape-token-7"
LIMITS = {
    "AGENTSITE_MAX_STREAMS_PER_KEY": str(CAP),
    "AGENTSITE_AUTH_FAILURE_RATE_LIMIT": f"{FAILURES}/minute",
    "AGENTSITE_METRICS_TOKEN": METRICS_TOKEN,
}
STREAM = {"Accept": "text/event-stream"}


def start(tmp_path_factory: pytest.TempPathFactory, name: str) -> ApiServer:
    return start_api_server(tmp_path_factory.mktemp(name) / "uvicorn.log", **LIMITS)


@pytest.fixture(scope="module")
def servers(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ApiServer, ApiServer]]:
    if not uses_real_services():
        pytest.skip("integration tests need Postgres and Redis: run them with `make test`")
    first = start(tmp_path_factory, "api-a")
    try:
        second = start(tmp_path_factory, "api-b")
    except BaseException:
        stop_process(first.process, grace=15)
        raise
    try:
        yield first, second
    finally:
        for server in (first, second):
            stop_process(server.process, grace=15)


class Caller:
    """A user with an API key, and a run of theirs that stays unfinished (it waits for a
    reviewer), so its event stream stays open."""

    def __init__(self, agent: Agent) -> None:
        self.user = User.objects.create_user(username=f"streamer-{uuid.uuid4().hex[:8]}")
        self.key, self.plain = create_api_key(user=self.user, name="streams")
        self.run = submit_run(agent=agent, input="6*7", owner=self.user, api_key=self.key)
        self.auth = {"Authorization": f"Bearer {self.plain}"}

    @property
    def events(self) -> str:
        return f"/api/v1/runs/{self.run.pk}/events/"


@pytest.fixture
def agent(make_agent: Any) -> Agent:
    return make_agent(
        grants={"calculator": {"mode": "require_approval"}},
        script=[
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
            {"text": "{last_tool_result}"},
        ],
    )


class OpenStream:
    """An event stream held open until ``close()`` (the client going away)."""

    def __init__(self, server: ApiServer, path: str, **kwargs: Any) -> None:
        self.client = httpx.Client(base_url=server.base_url, timeout=STREAM_TIMEOUT, **kwargs)
        self._context = self.client.stream("GET", path, headers=STREAM)
        self.response = self._context.__enter__()
        assert self.response.status_code == 200, self.response.read()
        # Kept: a frame iterator collected closes the connection (the client going away).
        self.frames = sse_frames(self.response)
        assert next(self.frames).event == "run.submitted"  # served: the run's first event

    def close(self) -> None:
        self._context.__exit__(None, None, None)
        self.client.close()


@pytest.fixture
def streams() -> Iterator[list[OpenStream]]:
    opened: list[OpenStream] = []
    yield opened
    for stream in opened:
        stream.close()


def refused_stream(server: ApiServer, path: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=10, **kwargs) as client:
        return client.get(path, headers=STREAM)


def opens(server: ApiServer, path: str, **kwargs: Any) -> bool:
    """Whether a stream opens now (it is closed again at once)."""
    with (
        httpx.Client(base_url=server.base_url, timeout=STREAM_TIMEOUT, **kwargs) as client,
        client.stream("GET", path, headers=STREAM) as response,
    ):
        return response.status_code == 200


def slots(caller: str) -> dict[str, float]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    name = rediskeys.key(f"streams:{caller}")
    return {member.decode(): score for member, score in client.zrange(name, 0, -1, withscores=True)}


# --- The cap of open streams ------------------------------------------------------------------


def test_the_stream_cap_of_a_key_holds_across_api_processes(servers, agent, streams):
    a, b = servers
    caller, other = Caller(agent), Caller(agent)
    streams.append(OpenStream(a, caller.events, headers=caller.auth))
    streams.append(OpenStream(b, caller.events, headers=caller.auth))
    assert len(slots(f"key:{caller.key.prefix}")) == CAP

    for server in (a, b):
        refused = refused_stream(server, caller.events, headers=caller.auth)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == str(streamslots.RETRY_AFTER_SECONDS)
        error = refused.json()["error"]
        assert error["code"] == "too_many_streams" and f"{CAP} event streams" in error["message"]

    # Another key has its own streams; the same key may still poll the events as JSON.
    assert opens(a, other.events, headers=other.auth)
    with httpx.Client(base_url=b.base_url, headers=caller.auth) as client:
        assert client.get(caller.events).status_code == 200


def test_a_stream_whose_client_goes_away_gives_its_slot_back(servers, agent, streams):
    a, b = servers
    caller = Caller(agent)
    first = OpenStream(a, caller.events, headers=caller.auth)
    streams.append(OpenStream(b, caller.events, headers=caller.auth))
    assert refused_stream(b, caller.events, headers=caller.auth).status_code == 429

    first.close()  # the client disconnects; the server's stream never reaches its end

    poll(lambda: len(slots(f"key:{caller.key.prefix}")) == 1, timeout=10, what="the release")
    streams.append(OpenStream(b, caller.events, headers=caller.auth))


def test_admin_session_streams_count_per_user(servers, agent, streams):
    a, b = servers
    caller = Caller(agent)
    browser = Client()
    browser.force_login(caller.user)
    session = {"cookies": {settings.SESSION_COOKIE_NAME: browser.cookies["sessionid"].value}}
    streams.append(OpenStream(a, caller.events, **session))
    streams.append(OpenStream(b, caller.events, **session))

    refused = refused_stream(a, caller.events, **session)

    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
    assert len(slots(f"user:{caller.user.pk}")) == CAP
    assert opens(b, caller.events, headers=caller.auth)  # the user's key counts on its own


def test_the_streams_of_a_killed_process_run_out(servers, agent, tmp_path_factory):
    _, b = servers
    doomed = start(tmp_path_factory, "api-doomed")
    caller = Caller(agent)
    held = [OpenStream(doomed, caller.events, headers=caller.auth) for _ in range(CAP)]
    name = rediskeys.key(f"streams:key:{caller.key.prefix}")
    counter = redis.Redis.from_url(settings.REDIS_URL)

    os.killpg(doomed.process.pid, signal.SIGKILL)  # no finally runs: nothing is given back
    doomed.process.wait()
    for stream in held:
        stream.close()

    assert refused_stream(b, caller.events, headers=caller.auth).status_code == 429
    seconds, micros = counter.time()
    now_ms = seconds * 1000 + micros // 1000
    leases = slots(f"key:{caller.key.prefix}")
    assert len(leases) == CAP
    assert all(end <= now_ms + streamslots.LEASE_SECONDS * 1000 for end in leases.values())
    assert 0 < counter.pttl(name) <= streamslots.LEASE_SECONDS * 1000  # the set itself expires
    # The leases' time passes (rather than waiting it out here):
    counter.zadd(name, dict.fromkeys(leases, now_ms - 1), xx=True)
    assert opens(b, caller.events, headers=caller.auth)


# --- Failed authentications -------------------------------------------------------------------


def test_failed_authentications_are_counted_across_processes_and_entry_points(servers, agent):
    a, b = servers
    caller = Caller(agent)
    guess = {"Authorization": f"Bearer {apikeys.generate()[0]}"}
    with httpx.Client(base_url=a.base_url) as on_a, httpx.Client(base_url=b.base_url) as on_b:
        assert on_a.get("/api/v1/runs/", headers=guess).status_code == 401
        stream = on_b.get(caller.events, headers={**guess, **STREAM})
        assert stream.status_code == 401 and stream.json()["error"]["code"] == (
            "authentication_failed"
        )
        scrape = on_a.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
        assert scrape.status_code == 401
        assert on_b.get("/api/v1/whoami/", headers=guess).status_code == 401

        # FAILURES from 127.0.0.1, on two processes: now even right credentials wait.
        refusals = [
            on_a.get("/api/v1/runs/", headers=caller.auth),
            on_b.get(caller.events, headers={**caller.auth, **STREAM}),
            on_b.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}),
        ]
    for refused in refusals:
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "throttled"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert ApiKey.objects.get(pk=caller.key.pk).last_used_at is None  # never even looked up
    assert Run.objects.filter(pk=caller.run.pk).exists()
