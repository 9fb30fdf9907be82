"""The keys Agentsite keeps in Redis, under one prefix, and the clients that reach them.

Every key the project writes (rate limits, quotas, circuit breakers, worker heartbeats, event
stream counts) is named here by ``key()``, and kombu prefixes the broker's own keys (queues,
bindings, unacked messages, the fan-out channels) with the same ``AGENTSITE_REDIS_KEY_PREFIX``
(its ``global_keyprefix``). Two deployments, or two checkouts running their test suites, can
then share one Redis database without seeing each other's keys or tasks. The default prefix is
empty: keys keep the names they always had (``agentsite:quota:...``, ``celery``), so an upgrade
strands no queued message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings

R = TypeVar("R")

NAMESPACE = "agentsite:"


def prefix() -> str:
    """What every key of this deployment starts with (the broker's keys included)."""
    return str(settings.AGENTSITE_REDIS_KEY_PREFIX)


def key(name: str) -> str:
    """The Redis key of one of Agentsite's own values: ``key("quota:x")`` is
    ``<prefix>agentsite:quota:x``."""
    return f"{settings.AGENTSITE_REDIS_KEY_PREFIX}{NAMESPACE}{name}"


def broker_key(name: str) -> str:
    """The Redis key kombu uses for ``name`` (a queue, ``unacked``...) under the prefix."""
    return f"{settings.AGENTSITE_REDIS_KEY_PREFIX}{name}"


_lock = threading.Lock()
_clients: dict[tuple[str, float, bool], Any] = {}
_scripts: dict[tuple[int, str], Any] = {}


def client(url: str = "", *, timeout: float = 2.0, retry_once: bool = False) -> Any:
    """The process's client of ``url`` (default ``REDIS_URL``), one per URL and options: a
    connection pool, thread-safe and cooperative under gevent. Short timeouts: what waits on
    Redis (a request's limit, a scrape, a heartbeat) must not hang. ``retry_once``: one
    immediate retry after a connection error instead of redis-py's retries with seconds of
    backoff (for what is asked on every tool or model call: the circuit breaker)."""
    url = url or settings.REDIS_URL
    with _lock:
        found = _clients.get((url, timeout, retry_once))
        if found is None:
            import redis  # lazily: 0.1 s to import, and a process may never reach Redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            options: dict[str, Any] = {}
            if retry_once:
                options["retry"] = Retry(NoBackoff(), 1)
            found = _clients[(url, timeout, retry_once)] = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, **options
            )
        return found


def script(source: str, *, timeout: float = 2.0, retry_once: bool = False) -> Any:
    """A Lua script on ``client()`` (called with ``keys=`` and ``args=``; EVALSHA, loaded on
    first use)."""
    redis_client = client(timeout=timeout, retry_once=retry_once)
    with _lock:
        found = _scripts.get((id(redis_client), source))
        if found is None:
            found = _scripts[(id(redis_client), source)] = redis_client.register_script(source)
        return found


class FailOpen:
    """Calls to Redis that fail open: when Redis fails (down, timing out), the caller gets a
    fallback that lets its work go ahead, and a warning is logged instead of an error raised.
    Redis holds limits and circuits, not data: refusing every request or call on a Redis blip
    would do more harm than letting a few through unlimited.

    ``errors`` are the failures caught (default: redis-py's ``RedisError``). ``message`` is
    logged with the call's ``context`` and the error as its arguments, at most
    once per ``warn_every`` seconds (0: every failure). With ``rest_for``, the process leaves
    Redis alone (answers the fallback at once) for that many seconds after a failure, so a
    black-holed Redis does not add its timeouts to every call.
    """

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        errors: tuple[type[BaseException], ...] | None = None,
        warn_every: float = 0.0,
        rest_for: float = 0.0,
    ) -> None:
        self.logger = logger
        self.message = message
        self.errors = errors
        self.warn_every = warn_every
        self.rest_for = rest_for
        self.warned_at = -math.inf
        self._down_until: dict[str, float] = {}  # per REDIS_URL, so tests may switch it
        self._lock = threading.Lock()

    def call(self, op: Callable[[], R], fallback: R, *context: object) -> R:
        """``op()``, or ``fallback`` if Redis fails or failed less than ``rest_for`` ago."""
        url = settings.REDIS_URL
        if self.rest_for and time.monotonic() < self._down_until.get(url, 0.0):
            return fallback
        try:
            result = op()
        except self._caught() as exc:
            if self.rest_for:
                self._down_until[url] = time.monotonic() + self.rest_for
            self._warn(*context, exc)
            return fallback
        if url in self._down_until:
            self._down_until.pop(url, None)
        return result

    def _caught(self) -> tuple[type[BaseException], ...]:
        if self.errors is None:
            from redis.exceptions import RedisError

            self.errors = (RedisError,)
        return self.errors

    def _warn(self, *args: object) -> None:
        if self.warn_every:
            now = time.monotonic()
            with self._lock:
                if now - self.warned_at < self.warn_every:
                    return
                self.warned_at = now
        self.logger.warning(self.message, *args)
