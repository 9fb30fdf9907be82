"""Shared fixtures: agent builders, the fake model server, and a real Celery worker process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings
from django.db import connection

from agents import engine
from agents.models import Agent, Run, Step
from agents.providers.fake_server import FakeOpenAIServer
from agents.services import save_agent
from tools.services import execute_tool_call

# The test-only tools, registered in this process as AGENTSITE_TOOL_MODULES registers them in
# the worker (the catalogue is synced when the test database is migrated).
from .tools import sample_tools  # noqa: F401

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
# The worker and the API server sign and allow webhooks with these; `webhook_secret` makes the
# test process agree, so `agents.webhooks.verify` checks what the worker signed.
TEST_WEBHOOK_SECRET = "test-webhook-secret-0f3a9c"
WEBHOOK_ENV = {
    "AGENTSITE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "AGENTSITE_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
}


def poll(
    predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Return the first truthy value of ``predicate()``, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


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


def drive(run_id: Any, *, max_iterations: int = 100) -> Run:
    """Advance a run in this process, as workers would, until it is final or waits for something.

    Performs tool calls in index order; a retry outcome is followed at once (no backoff wait).
    """
    for _ in range(max_iterations):
        run = Run.objects.get(pk=run_id)
        if run.is_final:
            return run
        # Time passes: a step backing off after a transient failure may be taken now.
        Step.objects.filter(run=run, status=Step.Status.PENDING).update(not_before=None)
        tools = list(
            Step.objects.filter(run=run, kind=Step.Kind.TOOL, status=Step.Status.PENDING)
            .order_by("index")
            .values_list("index", flat=True)
        )
        if tools:
            for index in tools:
                execute_tool_call(run_id=run.pk, step_index=index)
        elif run.status == Run.Status.WAITING_APPROVAL:
            return run  # a reviewer decides next
        else:
            engine.advance(run.pk)
    raise AssertionError(f"run {run_id} did not finish in {max_iterations} iterations")


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer().start()
    yield server
    server.stop()


def stop_process(process: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM (a warm shutdown), then kill the process group if it is still there."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _uses_real_services() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql") and (
        settings.CELERY_BROKER_URL.startswith("redis")
    )


def _test_database_url() -> str:
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))


# The pool the test worker runs: the one production runs (gevent), unless a run of the suite
# asks for another (AGENTSITE_TEST_WORKER_POOL=prefork checks the engine under prefork).
TEST_WORKER_POOL = os.environ.get("AGENTSITE_TEST_WORKER_POOL", "gevent")


class WorkerProcess:
    def __init__(
        self, command: list[str], env: dict[str, str], name: str, log: Path, pool: str
    ) -> None:
        self.command = command
        self.env = env
        self.name = name
        self.log = log
        self.pool = pool
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        from agentsite.celery import app

        process = self.process
        poll(
            lambda: (
                process.poll() is not None or app.control.ping(destination=[self.name], timeout=0.5)
            ),
            timeout=60,
            what="the Celery worker to answer a ping",
        )
        if process.poll() is not None:
            pytest.fail(f"the Celery worker exited at start:\n{self.log_tail()}")

    def restart(self) -> None:
        """Start the worker again after a test killed it (same name, queues and settings)."""
        if self.process.poll() is None:
            stop_process(self.process, grace=30)
        self.process = self._spawn()
        self.wait_ready()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def task_totals(self) -> dict[str, int]:
        """How many tasks of each name this worker has finished (Celery's own counters)."""
        from agentsite.celery import app

        stats = app.control.inspect(destination=[self.name], timeout=2).stats() or {}
        return dict(stats.get(self.name, {}).get("total", {}))


@pytest.fixture(autouse=True)
def _fresh_model_limits() -> None:
    """Each test starts with no rate-limit pause or open model circuit left by an earlier one
    (they live in Redis, shared with the session's worker, and "fake" is every test's
    provider)."""
    if not settings.REDIS_URL:
        return
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    for pattern in ("agentsite:quota:*", "agentsite:breaker:model:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="session")
def celery_worker(
    django_db_setup: None,
    django_db_blocker: Any,
    fake_openai: FakeOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """A real ``celery worker`` process on the test database, Redis and the fake model server."""
    if not _uses_real_services():
        pytest.skip("integration tests need Postgres and Redis: run them with `make test`")
    import redis

    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()  # no messages from earlier runs
    name = f"pytest-{os.getpid()}@{socket.gethostname()}"
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
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
        **WEBHOOK_ENV,
    }
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "agentsite",
        "worker",
        "-P",
        TEST_WORKER_POOL,
        "-Q",
        "models,tools,maintenance,default",
        "--concurrency",
        "100" if TEST_WORKER_POOL == "gevent" else "4",
        "--prefetch-multiplier",
        "2" if TEST_WORKER_POOL == "gevent" else "1",
        "--loglevel",
        "INFO",
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
    ]
    log.write_bytes(b"")
    worker = WorkerProcess(command, env, name, log, TEST_WORKER_POOL)
    try:
        worker.wait_ready()
        yield worker
    finally:
        stop_process(worker.process, grace=30)


@pytest.fixture
def webhook_secret(settings: Any) -> str:
    """This process signs and verifies webhooks with the secret the worker and server use."""
    settings.AGENTSITE_WEBHOOK_SECRET = TEST_WEBHOOK_SECRET
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    return TEST_WEBHOOK_SECRET


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiServer:
    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_api_server(log: Path, *, log_level: str = "warning", **env: str) -> ApiServer:
    """The ASGI app under uvicorn (one process) on the test database and Redis, answering
    /healthz; ``env`` adds to (or overrides) its environment. Stop it with ``stop_process``."""
    import httpx

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "AGENTSITE_EVENTS_POLL_SECONDS": "0.1",
        **WEBHOOK_ENV,
        **env,
    }

    def answers() -> bool:
        if process.poll() is not None:
            return True
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "agentsite.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--log-level",
                log_level,
            ],  # fmt: skip
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ApiServer(process, base_url, log)
    try:
        poll(answers, timeout=60, interval=0.1, what="the API server to answer /healthz")
    except BaseException:
        stop_process(process, grace=15)
        raise
    if process.poll() is not None:
        pytest.fail(f"the API server exited at start:\n{server.log_tail()}")
    return server


@pytest.fixture(scope="session")
def api_server(
    django_db_setup: None,
    django_db_blocker: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    """The ASGI app under uvicorn (one process) on the test database and Redis, over HTTP."""
    if not _uses_real_services():
        pytest.skip("integration tests need Postgres and Redis: run them with `make test`")
    server = start_api_server(tmp_path_factory.mktemp("api") / "uvicorn.log")
    try:
        yield server
    finally:
        stop_process(server.process, grace=15)
