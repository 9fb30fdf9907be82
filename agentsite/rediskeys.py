"""Names of the keys Agentsite keeps in Redis, under one prefix.

Every key the project writes (rate limits, quotas, circuit breakers, worker heartbeats, event
stream counts) is named here by ``key()``, and kombu prefixes the broker's own keys (queues,
bindings, unacked messages, the fan-out channels) with the same ``AGENTSITE_REDIS_KEY_PREFIX``
(its ``global_keyprefix``). Two deployments, or two checkouts running their test suites, can
then share one Redis database without seeing each other's keys or tasks. The default prefix is
empty: keys keep the names they always had (``agentsite:quota:...``, ``celery``), so an upgrade
strands no queued message.
"""

from __future__ import annotations

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
