"""Per-key request rate limits, counted atomically in Redis so they hold across web processes.

A fixed window per key: one Lua script increments the window's counter and sets its expiry in
one step, so concurrent requests can never both slip under the limit (DRF's cache-based
throttles read and write in two steps and race). Without Redis (the embedded default) limits
are off.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from rest_framework.throttling import BaseThrottle

from . import rediskeys
from .clientaddress import client_address

logger = logging.getLogger(__name__)
# Redis down: serve rather than refuse every client.
_fail_open = rediskeys.FailOpen(logger, "rate limiting unavailable: %s", errors=(Exception,))

_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {count, ttl}
"""
_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def parse_rate(rate: str) -> tuple[int, int] | None:
    """'1200/minute' -> (1200, 60); '' -> None."""
    if not rate:
        return None
    count, _, period = rate.partition("/")
    try:
        return int(count), _PERIODS[period.strip().rstrip("s")]
    except (ValueError, KeyError):
        raise ValueError(f"invalid rate {rate!r}: use '<n>/<second|minute|hour|day>'") from None


def hit(bucket: str, *, limit: int, period: int) -> tuple[bool, float]:
    """Count one request in ``bucket``; returns (allowed, seconds until the window resets)."""
    script = rediskeys.script(_SCRIPT, timeout=1)  # a limit must not hang a request
    count, ttl_ms = script(keys=[rediskeys.key(f"rate:{bucket}")], args=[period * 1000])
    return int(count) <= limit, max(0.0, int(ttl_ms) / 1000)


def peek(bucket: str) -> tuple[int, float]:
    """``bucket``'s count in its window, counting nothing, and seconds until the window resets
    (0 with no window open)."""
    client = rediskeys.client(timeout=1)  # a limit must not hang a request
    name = rediskeys.key(f"rate:{bucket}")
    count = int(client.get(name) or 0)
    if not count:
        return 0, 0.0
    return count, max(0.0, int(client.pttl(name)) / 1000)


def seconds_to_wait(bucket: str) -> float | None:
    """Count one request of ``bucket`` against AGENTSITE_API_RATE_LIMIT: None if it may go
    ahead, else how long to wait. Limits are off without Redis, and fail open if it is down."""
    rate = parse_rate(settings.AGENTSITE_API_RATE_LIMIT)
    if rate is None or not settings.REDIS_URL:
        return None
    counted = _fail_open.call(lambda: hit(bucket, limit=rate[0], period=rate[1]), None)
    if counted is None:
        return None
    allowed, reset = counted
    return None if allowed else max(1.0, reset)


def bucket_for(user: Any, api_key: Any) -> str:
    """One bucket per API key; per user for session auth."""
    return f"key:{api_key.prefix}" if api_key is not None else f"user:{user.pk}"


class ApiKeyRateThrottle(BaseThrottle):
    """``AGENTSITE_API_RATE_LIMIT`` per API key (or per user for session auth)."""

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Any, view: Any) -> bool:
        if request.user is not None and request.user.is_authenticated:
            key = request.auth if hasattr(request.auth, "prefix") else None
            bucket = bucket_for(request.user, key)
        else:
            bucket = f"ip:{self.get_ident(request)}"
        self._wait = seconds_to_wait(bucket)
        return self._wait is None

    def get_ident(self, request: Any) -> str:
        """The client's address as every per-address limit sees it (AGENTSITE_TRUSTED_PROXIES
        decides whether X-Forwarded-For counts, not DRF's NUM_PROXIES)."""
        return client_address(request)

    def wait(self) -> float | None:
        return self._wait
