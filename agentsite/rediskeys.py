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

import threading
from typing import Any

from django.conf import settings

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
_clients: dict[tuple[str, float], Any] = {}
_scripts: dict[tuple[int, str], Any] = {}


def client(url: str = "", *, timeout: float = 2.0) -> Any:
    """The process's client of ``url`` (default ``REDIS_URL``), one per URL and timeout: a
    connection pool, thread-safe and cooperative under gevent. Short timeouts: what waits on
    Redis (a request's limit, a scrape, a heartbeat) must not hang."""
    url = url or settings.REDIS_URL
    with _lock:
        found = _clients.get((url, timeout))
        if found is None:
            import redis

            found = _clients[(url, timeout)] = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        return found


def script(source: str, *, timeout: float = 2.0) -> Any:
    """A Lua script on ``client()`` (called with ``keys=`` and ``args=``; EVALSHA, loaded on
    first use)."""
    redis_client = client(timeout=timeout)
    with _lock:
        found = _scripts.get((id(redis_client), source))
        if found is None:
            found = _scripts[(id(redis_client), source)] = redis_client.register_script(source)
        return found
