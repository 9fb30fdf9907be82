"""The event streams each API key (or admin user) has open, capped at
``AGENTSITE_MAX_STREAMS_PER_KEY`` across every web process.

Each caller has a sorted set in Redis: one member per open stream, scored by when its lease
ends. A stream takes a slot when it opens (refused if the caller's live slots are at the cap),
renews its lease while it lives, and gives the slot back when it ends or its client goes away.
A process that dies holding slots cannot give them back: their leases run out, and the set's
own TTL (renewed with every lease) bounds it. Without Redis the count is per process; if Redis
is down streams are not refused.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from django.conf import settings

from agentsite import rediskeys

logger = logging.getLogger(__name__)
# Redis down: serve the stream rather than refuse every one.
_uncounted = rediskeys.FailOpen(logger, "event stream count unavailable: %s", errors=(Exception,))
# Not released: its lease runs out instead.
_unreleased = rediskeys.FailOpen(logger, "event stream slot not released: %s", errors=(Exception,))

# A stream renews its lease at its chunks, which come at least every keep-alive (15 s) plus a
# poll; a lease of three keep-alives survives a slow poll, and a dead process's slots are free
# again within it.
LEASE_SECONDS = 45.0
RENEW_AFTER_SECONDS = 10.0
# What a refused client is told to wait: streams last minutes, so this is a polite retry pace.
RETRY_AFTER_SECONDS = 5

# KEYS[1] the caller's set; ARGV: slot id, cap (0: none), lease in ms. Returns 1 if taken.
# Redis's own clock scores the leases, so web hosts' clocks need not agree.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[2])
if cap > 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
   and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Without Redis: caller -> {slot id: monotonic end of its lease}.
_local: dict[str, dict[str, float]] = {}
_local_lock = threading.Lock()


@dataclass
class Slot:
    """A stream's place among its caller's open streams."""

    caller: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    renewed: float = field(default_factory=time.monotonic)
    counted: bool = True  # False: taken while there was no cap, or Redis was down


def _redis_key(caller: str) -> str:
    return rediskeys.key(f"streams:{caller}")


def _take_in_redis(slot: Slot, cap: int) -> bool:
    script = rediskeys.script(_TAKE, timeout=1)
    return bool(
        script(keys=[_redis_key(slot.caller)], args=[slot.id, cap, int(LEASE_SECONDS * 1000)])
    )


def _take_locally(slot: Slot, cap: int) -> bool:
    now = time.monotonic()
    with _local_lock:
        live = {i: end for i, end in _local.get(slot.caller, {}).items() if end > now}
        if cap > 0 and slot.id not in live and len(live) >= cap:
            _local[slot.caller] = live
            return False
        live[slot.id] = now + LEASE_SECONDS
        _local[slot.caller] = live
        return True


def _take(slot: Slot, cap: int) -> bool:
    if not settings.REDIS_URL:
        return _take_locally(slot, cap)
    taken = _uncounted.call(lambda: _take_in_redis(slot, cap), None)
    if taken is None:
        slot.counted = False
        return True
    return taken


def acquire(caller: str) -> Slot | None:
    """A slot for a new stream of ``caller`` (``bucket_for``'s name), or None if the caller
    has ``AGENTSITE_MAX_STREAMS_PER_KEY`` open already."""
    cap = settings.AGENTSITE_MAX_STREAMS_PER_KEY
    slot = Slot(caller=caller, counted=cap > 0)
    if not slot.counted:
        return slot
    return slot if _take(slot, cap) else None


def renewal_due(slot: Slot) -> bool:
    return slot.counted and time.monotonic() - slot.renewed >= RENEW_AFTER_SECONDS


def renew(slot: Slot) -> None:
    """Extend the lease of a live stream's slot (taken again if it had run out, whatever the
    cap: the stream is open)."""
    if not slot.counted:
        return
    slot.renewed = time.monotonic()
    _take(slot, 0)


def release(slot: Slot) -> None:
    """Give the slot back: the stream ended or its client went away."""
    if not slot.counted:
        return
    if not settings.REDIS_URL:
        with _local_lock:
            _local.get(slot.caller, {}).pop(slot.id, None)
            if not _local.get(slot.caller, True):
                del _local[slot.caller]
        return
    _unreleased.call(
        lambda: rediskeys.client(timeout=1).zrem(_redis_key(slot.caller), slot.id), None
    )
