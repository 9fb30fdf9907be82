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
from pytest_django.fixtures import validate_django_db

from agents import engine
from agents.engine import execute_tool_call
from agents.models import Agent, Run, Step
from agents.providers.fake_server import FakeOpenAIServer
from agents.services import save_agent

# The test-only tools, registered in this process as AGENTSITE_TOOL_MODULES registers them in
# the worker (the catalogue is synced when the test database is migrated).
from .tools import sample_tools  # noqa: F401

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
# The worker and the API server sign and allow webhooks with these; `webhook_secret` makes the
# test process agree, so `agents.webhooks.verify` checks what the worker signed.
TEST_WEBHOOK_SECRET = "test-webhook-secret-0f3a9c"
# Test servers listen on random local ports: allow any port of 127.0.0.1, and loopback
# addresses, which http_get and webhooks refuse by default.
LOOPBACK_NETWORKS = ["127.0.0.0/8"]
WEBHOOK_ENV = {
    "AGENTSITE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1:*",
    "AGENTSITE_OUTBOUND_ALLOWED_NETWORKS": ",".join(LOOPBACK_NETWORKS),
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


# Every worker process a test started and that may still run (the session's, and a module's own),
# drained before each flush (see _worker_quiet_around_flushes).
LIVE_WORKERS: list[WorkerProcess] = []
# Loaded by every test worker: the remote-control command that drains it.
WORKER_CONTROL = ["--include", "tests.workercontrol"]


def _queues_of(command: list[str]) -> list[str]:
    """The queues a worker command consumes: its -Q, or every queue of the project."""
    from agentsite.heartbeats import celery_queues

    for flag in ("-Q", "--queues"):
        if flag in command:
            return command[command.index(flag) + 1].split(",")
    return celery_queues()


class WorkerProcess:
    def __init__(
        self, command: list[str], env: dict[str, str], name: str, log: Path, pool: str
    ) -> None:
        self.command = command if "tests.workercontrol" in command else [*command, *WORKER_CONTROL]
        self.env = env
        self.name = name
        self.log = log
        self.pool = pool
        self.queues = _queues_of(command)
        self.held: set[str] = set()  # queues a module keeps this worker off (hold / release)
        self.restartable = False  # the session's worker: a test that killed it is followed by
        # a restart; a module's own workers are gone with their module.
        self.process = self._spawn()
        LIVE_WORKERS.append(self)

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
        if self.held:
            self.hold(*self.held)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def hold(self, *queues: str) -> None:
        """Stop consuming ``queues`` until ``release`` (e.g. while a module's own workers
        take them); resuming after a test leaves them off."""
        from agentsite.celery import app

        self.held.update(queues)
        for queue in queues:
            replies = app.control.cancel_consumer(
                queue, destination=[self.name], reply=True, timeout=5
            )
            assert replies, f"worker {self.name} did not answer cancel_consumer"

    def release(self, *queues: str) -> None:
        """Consume ``queues`` again."""
        from agentsite.celery import app

        self.held.difference_update(queues)
        if self.process.poll() is not None:
            return
        for queue in queues:
            app.control.add_consumer(queue, destination=[self.name], reply=True, timeout=5)

    def drain(self, *, timeout: float = 60.0) -> int:
        """Revoke what the worker holds for later (tests/workercontrol.py) and wait until
        nothing of it executes; how many messages the last call revoked (0: it held none)."""
        from agentsite.celery import app

        if self.process.poll() is not None:
            return 0  # killed by its test; the next test that uses it restarts it

        def idle() -> dict[str, int] | None:
            replies = app.control.broadcast(
                "agentsite_test_drain", destination=[self.name], reply=True, timeout=2
            )
            answer = next((r[self.name] for r in replies if self.name in r), None)
            return answer if answer is not None and answer.get("active") == 0 else None

        found = poll(idle, timeout=timeout, interval=0.05, what=f"worker {self.name} to idle")
        return int(found.get("revoked", 0))

    def task_totals(self) -> dict[str, int]:
        """How many tasks of each name this worker has finished (Celery's own counters)."""
        from agentsite.celery import app

        stats = app.control.inspect(destination=[self.name], timeout=2).stats() or {}
        return dict(stats.get(self.name, {}).get("total", {}))


def delete_redis_keys(pattern: str) -> None:
    """Delete the keys matching ``pattern`` (a SCAN pattern) in the suite's Redis."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL or settings.CELERY_BROKER_URL)
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) == 500:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)


def purge_queues() -> int:
    """Drop the messages waiting in the project's queues (kombu's priority lists included),
    keeping the queues' bindings, which running processes remember having declared; how many
    queues had messages."""
    import redis

    from agentsite import rediskeys
    from agentsite.heartbeats import celery_queues

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    names = [
        rediskeys.broker_key(queue if step == 0 else f"{queue}\x06\x16{step}")
        for queue in celery_queues()
        for step in (0, 3, 6, 9)
    ]
    return int(client.delete(*names))


@pytest.fixture(autouse=True)
def _fresh_model_limits() -> None:
    """Each test starts with no rate-limit pause or open model circuit left by an earlier one
    (they live in Redis, shared with the session's worker, and "fake" is every test's
    provider)."""
    if not settings.REDIS_URL:
        return
    from agentsite import rediskeys

    # ... nor failed authentications counted against 127.0.0.1, every test's client address.
    for name in ("quota:*", "breaker:model:*", "rate:authfail:*"):
        delete_redis_keys(rediskeys.key(name))


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
    if not _uses_real_services():
        pytest.skip("integration tests need Postgres and Redis: run them with `make test`")
    import redis

    # A worker left running by an earlier run of this suite (killed harness, orphaned child)
    # would take this run's tasks: say so rather than fail in strange ways.
    from agentsite import heartbeats

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
        # Its heartbeat says within a second which queues it consumes (hold, release).
        "AGENTSITE_WORKER_HEARTBEAT_TTL": "4",
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
        # No -Q: a worker consumes every queue the project declares (CELERY_TASK_QUEUES).
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
    from agentsite import outbound

    names: dict[str, list[str]] = {}

    def resolve(host: str, port: int) -> list[str]:
        if host.lower() in names:
            return list(names[host.lower()])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(outbound, "resolver", resolve)
    return names


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
