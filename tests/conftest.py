"""Fixtures and hooks only (what tests import lives in tests/support and harness/): agent and
reviewer builders, the fake model server, a real Celery worker process and the API server."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.test.utils import override_settings
from pytest_django.fixtures import validate_django_db

from agents.models import Agent
from agents.services import save_agent
from agentsite import heartbeats, outbound, rediskeys
from harness.fake_server import FakeOpenAIServer
from harness.processes import stop_process, worker_argv

from .support.processes import (
    LIVE_WORKERS,
    LOOPBACK_NETWORKS,
    TEST_WEBHOOK_SECRET,
    TEST_WORKER_POOL,
    WEBHOOK_ENV,
    ApiServer,
    WorkerProcess,
    delete_redis_keys,
    purge_queues,
    start_api_server,
    suite_database_url,
    uses_real_services,
)
from .support.users import make_reviewer

# The test-only tools, registered in this process as AGENTSITE_TOOL_MODULES registers them in
# the worker (the catalogue is synced when the test database is migrated).
from .tools import sample_tools  # noqa: F401


@pytest.fixture
def make_agent(db: None) -> Callable[..., Agent]:
    counter = iter(range(1, 10_000))

    def build(**fields: Any) -> Agent:
        slug = fields.pop("slug", None) or f"agent-{next(counter)}"
        grants = fields.pop("tools", None)
        grants = fields.pop("grants", grants)
        agent = Agent(slug=slug, name=fields.pop("name", slug), **fields)
        return save_agent(agent=agent, grants=grants)

    return build


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True, scope="session")
def _cheaper_test_process() -> Iterator[None]:
    """Two costs the suite pays per test and production pays once or never:
    - users are created and log in by the hundred: one PBKDF2 iteration, not a million
      (tests/support/hashers.py); servers started by a test still verify these passwords;
    - every test client builds the middleware afresh, and WhiteNoise (DEBUG off under
      pytest-django) would scan every static file of every app each time: it looks a file up
      when it is asked for instead, as it does in development."""
    hashers = ["tests.support.hashers.OneIterationPBKDF2PasswordHasher", *settings.PASSWORD_HASHERS]
    with override_settings(PASSWORD_HASHERS=hashers, WHITENOISE_AUTOREFRESH=True):
        yield


@pytest.fixture(autouse=True)
def _fresh_model_limits() -> None:
    """Each test starts with no rate-limit pause or open model circuit left by an earlier one
    (they live in Redis, shared with the session's worker, and "fake" is every test's
    provider)."""
    if not settings.REDIS_URL:
        return
    # ... nor failed authentications counted against 127.0.0.1, every test's client address.
    delete_redis_keys(
        *(rediskeys.key(n) for n in ("quota:*", "breaker:model:*", "rate:authfail:*"))
    )


@pytest.fixture(autouse=True)
def _worker_quiet_around_flushes(request: pytest.FixtureRequest) -> Iterator[None]:
    """The suite's workers execute nothing when a test's database is flushed (a TRUNCATE of
    every table deadlocked with the session's worker writing at the same moment): after a test
    that flushes (transactional) or used a worker, each live worker is drained
    (WorkerProcess.drain: what it held of the test is revoked, what it runs is waited for) and
    the queues are emptied, before pytest-django's flush, which runs when its database fixture
    is torn down, after this one."""
    transactional = (
        request.node.get_closest_marker("django_db") is not None
        and (validate_django_db(request.node.get_closest_marker("django_db"))[0])
    )
    transactional = transactional or "transactional_db" in request.fixturenames
    uses_worker = "celery_worker" in request.fixturenames
    if not (transactional or uses_worker):
        yield
        return
    if request.node.get_closest_marker("django_db") or {"db", "transactional_db"} & set(
        request.fixturenames
    ):
        request.getfixturevalue("_django_db_helper")  # set up first, so torn down after us
    if uses_worker:
        worker = request.getfixturevalue("celery_worker")
        if worker.process.poll() is not None:
            worker.restart()  # a test before this one killed it
    yield
    if not LIVE_WORKERS:
        return
    # Until nothing moves: a task that finished while we waited may have published its
    # follow-up (taken by a worker: revoked on the next round; still queued: purged).
    for _ in range(50):
        revoked = sum([worker.drain() for worker in LIVE_WORKERS])
        if not revoked and not purge_queues():
            break
    LIVE_WORKERS[:] = [w for w in LIVE_WORKERS if w.restartable or w.process.poll() is None]


@pytest.fixture(scope="session")
def celery_worker(
    django_db_setup: None,
    django_db_blocker: Any,
    fake_openai: FakeOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """A real ``celery worker`` process on the test database, Redis and the fake model server."""
    if not uses_real_services():
        pytest.skip("integration tests need Postgres and Redis: run them with `make test`")
    # A worker left running by an earlier run of this suite (killed harness, orphaned child)
    # would take this run's tasks: say so rather than fail in strange ways.
    stale = {w.name for w in heartbeats.live_workers()}
    if stale:
        wait = settings.AGENTSITE_WORKER_HEARTBEAT_TTL + 1  # stopped ones expire meanwhile
        deadline = time.monotonic() + wait
        while stale and time.monotonic() < deadline:
            time.sleep(0.5)
            stale = {w.name for w in heartbeats.live_workers()}
        if stale:
            pytest.fail(
                f"worker(s) {', '.join(sorted(stale))} still consume this suite's queues (Redis "
                f"key prefix {settings.AGENTSITE_REDIS_KEY_PREFIX!r}): stop them first"
            )
    # No message or key of an earlier run of this suite: its key space only (the keys' prefix,
    # AGENTSITE_REDIS_KEY_PREFIX, is the suite's own under make test), or the database if none.
    if settings.AGENTSITE_REDIS_KEY_PREFIX:
        delete_redis_keys(settings.AGENTSITE_REDIS_KEY_PREFIX + "*")
    else:
        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    name = f"pytest-{os.getpid()}@{socket.gethostname()}"
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **os.environ,
        "DATABASE_URL": suite_database_url(),
        "AGENTSITE_PROVIDER_FAKE_BASE_URL": fake_openai.base_url,
        "AGENTSITE_PROVIDER_FAKE_API_KEY": "sk-test-fake-key",
        "AGENTSITE_PROVIDER_FAKE_TIMEOUT": "5",
        "AGENTSITE_RETRY_BACKOFF_BASE": "0.05",
        "AGENTSITE_RETRY_BACKOFF_MAX": "1",
        "AGENTSITE_STALLED_AFTER": "3",
        "AGENTSITE_TOOL_MODULES": "tests.tools.sample_tools",
        # A killed tool call is taken over 2 s after its hard limit, not 40 s.
        "AGENTSITE_TOOL_HARD_LIMIT_GRACE": "1",
        "AGENTSITE_TOOL_LEASE_MARGIN": "1",
        "AGENTSITE_BREAKER_FAILURES": "3",
        "AGENTSITE_BREAKER_COOLDOWN": "2",
        # Fewer connections than calls in flight: a step must not pin one while it waits.
        "AGENTSITE_DB_POOL_MAX": "5",
        # Its heartbeat says within a second which queues it consumes (hold, release).
        "AGENTSITE_WORKER_HEARTBEAT_TTL": "4",
        **WEBHOOK_ENV,
    }
    command = worker_argv(
        name,
        pool=TEST_WORKER_POOL,
        concurrency=100 if TEST_WORKER_POOL == "gevent" else 4,
        queues=None,  # every queue the project declares (CELERY_TASK_QUEUES)
        loglevel="INFO",
    )
    log.write_bytes(b"")
    worker = WorkerProcess(command, env, name, log, TEST_WORKER_POOL)
    worker.restartable = True
    try:
        worker.wait_ready()
        yield worker
    finally:
        stop_process(worker.process, grace=30)
        LIVE_WORKERS.remove(worker)


@pytest.fixture
def webhook_secret(settings: Any) -> str:
    """This process signs and verifies webhooks with the secret the worker and server use."""
    settings.AGENTSITE_WEBHOOK_SECRET = TEST_WEBHOOK_SECRET
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1:*"]
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = LOOPBACK_NETWORKS
    return TEST_WEBHOOK_SECRET


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the test maps to addresses (``fake_dns["hooks.example.com"] = ["93.184.215.14"]``),
    resolved without asking a DNS server; any other name does not exist."""
    names: dict[str, list[str]] = {}

    def resolve(host: str, port: int) -> list[str]:
        if host.lower() in names:
            return list(names[host.lower()])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(outbound, "resolver", resolve)
    return names


@pytest.fixture(scope="session")
def api_server(
    django_db_setup: None,
    django_db_blocker: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    """The ASGI app under uvicorn (one process) on the test database and Redis, over HTTP."""
    if not uses_real_services():
        pytest.skip("integration tests need Postgres and Redis: run them with `make test`")
    server = start_api_server(tmp_path_factory.mktemp("api") / "uvicorn.log")
    try:
        yield server
    finally:
        stop_process(server.process, grace=15)


@pytest.fixture
def reviewer(db: None) -> User:
    """Rita, a staff user in the ``reviewers`` group (password ``REVIEWER_PASSWORD``)."""
    return make_reviewer("rita")
