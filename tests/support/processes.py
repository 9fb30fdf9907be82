"""The suite's own launchers on top of ``harness.processes``: Celery workers it can drain, hold
and restart, the API under uvicorn, and what they share (the test database's URL, the webhook
settings, the suite's Redis keys)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from django.conf import settings
from django.db import connection

from agentsite import rediskeys
from agentsite.celery import app
from agentsite.heartbeats import celery_queues
from harness.polling import poll
from harness.processes import ROOT, free_port, stop_process

__all__ = ["ROOT", "free_port", "poll", "stop_process"]

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


def uses_real_services() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql") and (
        settings.CELERY_BROKER_URL.startswith("redis")
    )


def suite_database_url() -> str:
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
        self.held.update(queues)
        for queue in queues:
            replies = app.control.cancel_consumer(
                queue, destination=[self.name], reply=True, timeout=5
            )
            assert replies, f"worker {self.name} did not answer cancel_consumer"

    def release(self, *queues: str) -> None:
        """Consume ``queues`` again."""
        self.held.difference_update(queues)
        if self.process.poll() is not None:
            return
        for queue in queues:
            app.control.add_consumer(queue, destination=[self.name], reply=True, timeout=5)

    def drain(self, *, timeout: float = 60.0) -> int:
        """Revoke what the worker holds for later (tests/workercontrol.py) and wait until
        nothing of it executes; how many messages the last call revoked (0: it held none)."""
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
        stats = app.control.inspect(destination=[self.name], timeout=2).stats() or {}
        return dict(stats.get(self.name, {}).get("total", {}))


# Deletes the keys matching any of ARGV (SCAN patterns), scanning on the server: one round trip.
_DELETE_MATCHING = """
local deleted = 0
for _, pattern in ipairs(ARGV) do
  local cursor = "0"
  repeat
    local reply = redis.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
    cursor = reply[1]
    for _, key in ipairs(reply[2]) do
      deleted = deleted + redis.call("DEL", key)
    end
  until cursor == "0"
end
return deleted
"""


@functools.cache
def suite_redis(url: str = "") -> redis.Redis:
    """The process's client of the suite's Redis (``url``: default REDIS_URL, or the broker's)."""
    return redis.Redis.from_url(url or settings.REDIS_URL or settings.CELERY_BROKER_URL)


def delete_redis_keys(*patterns: str) -> int:
    """Delete the keys matching any of ``patterns`` (SCAN patterns) in the suite's Redis; how
    many there were."""
    return int(suite_redis().eval(_DELETE_MATCHING, 0, *patterns))


def purge_queues() -> int:
    """Drop the messages waiting in the project's queues (kombu's priority lists included),
    keeping the queues' bindings, which running processes remember having declared; how many
    queues had messages."""
    client = suite_redis(settings.CELERY_BROKER_URL)
    names = [
        rediskeys.broker_key(queue if step == 0 else f"{queue}\x06\x16{step}")
        for queue in celery_queues()
        for step in (0, 3, 6, 9)
    ]
    return int(client.delete(*names))


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
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "DATABASE_URL": suite_database_url(),
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
