"""Failed authentications counted per client address: a bad API key, metrics token or admin
password. Past ``AGENTSITE_AUTH_FAILURE_RATE_LIMIT`` in a window, the address is answered 429
with Retry-After before any credentials it sends are checked, so keys and passwords cannot be
guessed at request speed.

Counted in Redis with the request rate limits' script (agentsite.ratelimit), so the limit holds
across web processes; off without Redis, and open if Redis is down. An IPv6 client is counted
by its /64, the block one subscriber usually holds.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from . import ratelimit, rediskeys
from .clientaddress import client_address
from .errors import ErrorCode, too_many_requests

logger = logging.getLogger(__name__)
# Redis down: check credentials rather than refuse everyone.
_fail_open = rediskeys.FailOpen(
    logger, "failed-authentication limit unavailable: %s", errors=(Exception,)
)


def _bucket(request: Any) -> str:
    address = client_address(request)
    if ":" in address:  # IPv6
        address = str(ipaddress.ip_network(f"{address}/64", strict=False))
    return f"authfail:{address}"


def _rate() -> tuple[int, int] | None:
    if not settings.REDIS_URL:
        return None
    return ratelimit.parse_rate(settings.AGENTSITE_AUTH_FAILURE_RATE_LIMIT)


def seconds_blocked(request: Any) -> int | None:
    """None if the client of ``request`` may try its credentials; else the seconds it must
    wait. Counts nothing."""
    rate = _rate()
    if rate is None:
        return None
    seen = _fail_open.call(lambda: ratelimit.peek(_bucket(request)), None)
    if seen is None:
        return None
    count, reset = seen
    return max(1, math.ceil(reset)) if count >= rate[0] else None


def record_failure(request: Any) -> None:
    """Count one failed authentication against the client of ``request``."""
    rate = _rate()
    if rate is None:
        return
    _fail_open.call(lambda: ratelimit.hit(_bucket(request), limit=rate[0], period=rate[1]), None)


MESSAGE = "Too many failed authentication attempts from this address."


def message(wait: int) -> str:
    """MESSAGE and the wait, worded as DRF's Throttled words it."""
    return f"{MESSAGE} Expected available in {wait} second{'' if wait == 1 else 's'}."


def too_many(wait: int) -> JsonResponse:
    """The 429 in the API's error shape (for views outside DRF)."""
    return too_many_requests(ErrorCode.THROTTLED, message(wait), wait)


def on_login_failed(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
    """``user_login_failed`` receiver: a wrong password given through a request counts (the
    admin's login form; a call without a request, as from a shell, does not)."""
    if request is not None:
        record_failure(request)


def guard_login(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A login view that answers 429 to a blocked client's sign-in before checking it."""

    @functools.wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method == "POST":
            wait = seconds_blocked(request)
            if wait is not None:
                return HttpResponse(
                    message(wait),
                    status=429,
                    content_type="text/plain; charset=utf-8",
                    headers={"Retry-After": str(wait)},
                )
        return view(request, *args, **kwargs)

    return guarded
