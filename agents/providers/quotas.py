"""Model quotas: rate limits (requests, tokens) shared by every worker, counted in Redis.

The engine calls :func:`acquire` before each model call with the quotas the call spends (the
provider's requests and tokens per window, the agent's), :func:`settle` afterwards to correct a
token estimate, and :func:`pause` when a provider answers 429 with a Retry-After.

Algorithm: a sliding window of sub-buckets. The window of ``W`` seconds is cut into
``BUCKETS`` buckets of width ``w = ceil(W / BUCKETS)`` (in µs); bucket ``j`` counts the units
taken at server times in ``[j*w, (j+1)*w)``. A quota is one Redis hash,
``agentsite:quota:<key>``, with the bucket number as field and the units as value (plus a
``pause`` field: until when it is refused). An acquire at server time ``t``, current bucket
``c = floor(t/w)``, sums buckets ``c-K .. c`` with ``K = ceil(W/w)``: the window's buckets plus
one, because the oldest bucket's start ``(c-K)*w <= t - K*w <= t - W``, so the sum covers every
unit taken in ``[t-W, t]`` whatever the window's alignment. The call is admitted when that sum
plus its cost is within the limit for every quota, and then its cost is added to bucket ``c`` of
each; otherwise nothing is written. Each operation is one Lua script reading the clock with
``redis.call('TIME')``: it runs atomically, and workers on different hosts share one clock.

Guarantee: in ANY interval of ``W`` seconds (sliding, not aligned to buckets) the units admitted
for a key never exceed its limit. Take the last admission in the interval, at ``t``: every other
unit admitted in the interval was taken earlier, within ``[t-W, t]``, so it was in the sum that
admission checked, and sum + cost <= limit. (Covering unaligned windows costs little: units
count for at most one bucket, ``W/60``, longer than an exact sliding log would count them. The
clock is the Redis host's, so the guarantee holds as long as that clock does not step back.)

Waiting: a refused acquire returns when all its quotas would fit, if nobody else takes units
meanwhile: the oldest buckets leave the sum one by one, bucket ``b`` at ``(b+K+1)*w``, so the
wait is the time until enough of them have left, or until a pause ends, whichever is later, plus
a random jitter of at most 10% of it and at most one bucket, so that waiters do not all come back
at once. The jitter only ever lengthens the wait: acquiring at the returned time is never early.

Settle rule: a positive delta (the call used more than its estimate) is added to the current
bucket, so it counts a little longer than if it had been charged with the call: conservative. A
negative delta gives units back from the OLDEST buckets in the window first, never taking a
bucket below zero, and whatever the window no longer holds is dropped. Giving back from the
oldest buckets keeps every suffix of the window (every later window) holding at least the units
really used there: had the give-back been taken from the current bucket or the newest ones (or
a bucket allowed below zero), a window that no longer contains the original call would be
credited units that were never charged to it and could over-admit by up to the delta. This
relies on the settle coming while the call's own bucket is still in the window (the call took
less than one window): a give-back for a call older than that is taken from other calls' units.

Redis down: if ``REDIS_URL`` is set but Redis fails (an error, a timeout), :func:`acquire` fails
OPEN (admits) and logs a warning at most once per 30 s per process; :func:`settle` and
:func:`pause` swallow the error the same way. Redis is also the Celery broker: when it is down no
new work arrives anyway, and refusing (or blocking) every model call in flight on a blip would
do more harm than a few calls over a provider's limit, which the provider answers with 429s that
the engine already handles. Without ``REDIS_URL`` (the embedded SQLite dev mode) the same
algorithm runs in this process's memory, so limits are per process.

A key must always be used with the same ``window``: the bucket numbers depend on it.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings

from agents.jsonsafe import count as _count
from agentsite import rediskeys

if TYPE_CHECKING:
    from agents.models import Agent

    from .base import ModelProvider, ModelResponse

logger = logging.getLogger(__name__)

#: Buckets per window: the more, the less longer than the window units count (one bucket at
#: most, see the module docstring), and the more fields a quota's hash holds.
BUCKETS = 60
_fail_open = rediskeys.FailOpen(
    logger, "rate limits are off (Redis failed in %s, failing open): %s", warn_every=30.0
)

# KEYS: one hash per quota. ARGV: bucket width (µs), span K (buckets summed besides the current
# one), TTL (ms), then each quota's limit and (capped) cost. Returns 0 if admitted, else the
# wait in µs.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local width = tonumber(ARGV[1])
local span = tonumber(ARGV[2])
local current = math.floor(now / width)
local wait = 0
local stale = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 + 2 * i])
  local cost = tonumber(ARGV[3 + 2 * i])
  local fields = redis.call('HGETALL', key)
  local used, buckets, amounts, old = 0, {}, {}, {}
  for j = 1, #fields, 2 do
    local value = tonumber(fields[j + 1])
    if fields[j] == 'pause' then
      if value > now then wait = math.max(wait, value - now) else old[#old + 1] = 'pause' end
    else
      local bucket = tonumber(fields[j])
      if bucket < current - span then
        old[#old + 1] = fields[j]
      else
        used = used + value
        buckets[#buckets + 1] = bucket
        amounts[bucket] = value
      end
    end
  end
  stale[i] = old
  local excess = used + cost - limit
  if excess > 0 then
    table.sort(buckets)
    for _, bucket in ipairs(buckets) do
      excess = excess - amounts[bucket]
      if excess <= 0 then
        wait = math.max(wait, (bucket + span + 1) * width - now)
        break
      end
    end
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[3 + 2 * i])
  if cost > 0 then redis.call('HINCRBY', key, string.format('%d', current), cost) end
  if #stale[i] > 0 then redis.call('HDEL', key, unpack(stale[i])) end
  redis.call('PEXPIRE', key, ARGV[3])
end
return 0
"""

# KEYS[1]: the quota's hash. ARGV: delta, bucket width (µs), span, TTL (ms). See "Settle rule".
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delta = tonumber(ARGV[1])
local current = math.floor(now / tonumber(ARGV[2]))
if delta > 0 then
  redis.call('HINCRBY', KEYS[1], string.format('%d', current), delta)
else
  local fields = redis.call('HGETALL', KEYS[1])
  local buckets, names, amounts = {}, {}, {}
  for j = 1, #fields, 2 do
    local bucket = tonumber(fields[j])
    if fields[j] ~= 'pause' and bucket >= current - tonumber(ARGV[3]) then
      buckets[#buckets + 1] = bucket
      names[bucket] = fields[j]
      amounts[bucket] = tonumber(fields[j + 1])
    end
  end
  table.sort(buckets)
  local owed = -delta
  for _, bucket in ipairs(buckets) do
    if owed <= 0 then break end
    local take = math.min(owed, amounts[bucket])
    if take == amounts[bucket] then
      redis.call('HDEL', KEYS[1], names[bucket])
    else
      redis.call('HINCRBY', KEYS[1], names[bucket], -take)
    end
    owed = owed - take
  end
end
local ttl = tonumber(ARGV[4])
local left = redis.call('PTTL', KEYS[1])
if left == -1 or (left >= 0 and left < ttl) then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""

# KEYS[1]: the quota's hash. ARGV[1]: the pause (µs). A longer pause already set is kept.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local before = tonumber(redis.call('HGET', KEYS[1], 'pause') or 0)
local until_ = math.max(now + tonumber(ARGV[1]), before)
redis.call('HSET', KEYS[1], 'pause', string.format('%d', until_))
local ttl = math.ceil((until_ - now) / 1000)
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""


@dataclass(frozen=True)
class Quota:
    """One limit a call spends: ``limit`` units in any window, ``cost`` of them for this call.

    A cost above the limit is taken as the whole limit (the call waits for an empty window
    rather than forever).
    """

    key: str  # e.g. "provider:local:requests", "provider:local:tokens", "agent:42:requests"
    limit: int  # units allowed in any window of `window` seconds
    cost: int  # units this call takes (capped at `limit`)

    def __post_init__(self) -> None:
        if self.limit < 1 or self.cost < 0:
            raise ValueError(f"quota {self.key!r}: limit must be >= 1 and cost >= 0")


def acquire(quotas: Sequence[Quota], *, window: float) -> float | None:
    """Atomically take every quota's cost, or none of them. None: admitted. Otherwise the
    seconds to wait until all of them would fit (> 0)."""
    width, span = _geometry(window)
    keys = [quota.key for quota in quotas]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key appears twice in one acquire: {keys}")
    if not quotas:
        return None
    costs = [(quota.limit, min(quota.cost, quota.limit)) for quota in quotas]
    if not settings.REDIS_URL:
        wait_us = _local.acquire(keys, costs, width, span)
    else:
        wait_us = _fail_open.call(
            lambda: rediskeys.script(_ACQUIRE, timeout=1)(
                keys=[_redis_key(key) for key in keys],
                args=[width, span, _ttl_ms(window), *(n for pair in costs for n in pair)],
            ),
            0,
            "acquire",
        )
    if not wait_us:
        return None
    wait = int(wait_us) / 1e6
    return wait + random.uniform(0, min(wait / 10, width / 1e6))


def settle(key: str, delta: int, *, window: float) -> None:
    """Correct a quota after the call (e.g. tokens: actual minus estimated; may be negative).

    Call it within one window of the acquire: see "Settle rule" in the module docstring."""
    width, span = _geometry(window)
    if not delta:
        return
    if not settings.REDIS_URL:
        _local.settle(key, delta, width, span)
        return
    _fail_open.call(
        lambda: rediskeys.script(_SETTLE, timeout=1)(
            keys=[_redis_key(key)], args=[delta, width, span, _ttl_ms(window)]
        ),
        None,
        "settle",
    )


def pause(key: str, seconds: float) -> None:
    """Refuse every acquire touching `key` for `seconds` (a provider's 429 Retry-After),
    across workers."""
    pause_us = math.ceil(seconds * 1e6)
    if pause_us <= 0:
        return
    if not settings.REDIS_URL:
        _local.pause(key, pause_us)
        return
    _fail_open.call(
        lambda: rediskeys.script(_PAUSE, timeout=1)(keys=[_redis_key(key)], args=[pause_us]),
        None,
        "pause",
    )


def quota_key(owner: str, unit: str) -> str:
    """A quota's key names the window it is counted in: a key's buckets are numbered by the
    window, so processes configured with different windows (a rolling deploy changing
    AGENTSITE_RATE_WINDOW_SECONDS) must not share one."""
    return f"{owner}:{unit}:{settings.AGENTSITE_RATE_WINDOW_SECONDS:g}s"


def provider_key(route: str) -> str:
    return quota_key(f"provider:{route.partition(':')[0]}", "requests")


def for_call(provider: ModelProvider, agent: Agent, estimate: int) -> list[Quota]:
    """The rate limits a call spends: the provider's (its requests quota always, so that a
    429's pause holds every worker back) and the agent's, each per minute."""
    if provider.name == "scripted":
        return []
    never = 2**31 - 1  # a quota with no limit still carries the provider's pause
    owner = f"provider:{provider.name}"
    spent = [Quota(quota_key(owner, "requests"), provider.requests_per_minute or never, 1)]
    if provider.tokens_per_minute:
        spent.append(Quota(quota_key(owner, "tokens"), provider.tokens_per_minute, estimate))
    if agent.requests_per_minute:
        spent.append(
            Quota(quota_key(f"agent:{agent.pk}", "requests"), agent.requests_per_minute, 1)
        )
    if agent.tokens_per_minute:
        spent.append(
            Quota(quota_key(f"agent:{agent.pk}", "tokens"), agent.tokens_per_minute, estimate)
        )
    return spent


def settle_tokens(spent: Sequence[Quota], response: ModelResponse, took: float) -> None:
    """Charge the token quotas what the call used instead of its estimate. A refund is only
    taken while the call's own charge is still inside the window (settle gives back
    from the oldest units it holds: after a longer call those would be other calls')."""
    window = settings.AGENTSITE_RATE_WINDOW_SECONDS
    actual = _count(response.input_tokens) + _count(response.output_tokens)
    for quota in spent:
        delta = actual - min(quota.cost, quota.limit)
        if ":tokens:" in quota.key and delta and (delta > 0 or took < window):
            settle(quota.key, delta, window=window)


def _redis_key(key: str) -> str:
    return rediskeys.key(f"quota:{key}")


def _geometry(window: float) -> tuple[int, int]:
    """The bucket width (µs) and the span K for ``window`` seconds (see the module docstring)."""
    if not window > 0:
        raise ValueError(f"window must be > 0 seconds, not {window!r}")
    window_us = max(1, round(window * 1e6))
    width = -(-window_us // BUCKETS)
    return width, -(-window_us // width)


def _ttl_ms(window: float) -> int:
    """Two windows: a quota's hash outlives every bucket it may still need."""
    return math.ceil(2 * window * 1000)


# -- without Redis ---------------------------------------------------------------------------


class _LocalQuotas:
    """The same buckets in this process's memory (no ``REDIS_URL``), on the monotonic clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, dict[int, int]] = {}
        self._paused: dict[str, int] = {}  # key -> until (µs)

    def acquire(self, keys: list[str], costs: list[tuple[int, int]], width: int, span: int) -> int:
        now = time.monotonic_ns() // 1000
        current = now // width
        wait = 0
        with self._lock:
            for key, (limit, cost) in zip(keys, costs, strict=True):
                wait = max(wait, self._paused.get(key, 0) - now)
                buckets = self._window(key, current - span)
                excess = sum(buckets.values()) + cost - limit
                for bucket in sorted(buckets):  # the oldest leave the window first
                    if excess <= 0:
                        break
                    excess -= buckets[bucket]
                    wait = max(wait, (bucket + span + 1) * width - now)
            if wait > 0:
                return wait
            for key, (_, cost) in zip(keys, costs, strict=True):
                self._paused.pop(key, None)
                buckets = self._buckets.setdefault(key, {})
                buckets[current] = buckets.get(current, 0) + cost
            return 0

    def settle(self, key: str, delta: int, width: int, span: int) -> None:
        current = time.monotonic_ns() // 1000 // width
        with self._lock:
            buckets = self._window(key, current - span)
            if delta > 0:
                self._buckets[key] = buckets
                buckets[current] = buckets.get(current, 0) + delta
                return
            owed = -delta
            for bucket in sorted(buckets):
                take = min(owed, buckets[bucket])
                buckets[bucket] -= take
                owed -= take
                if owed == 0:
                    break

    def pause(self, key: str, pause_us: int) -> None:
        until = time.monotonic_ns() // 1000 + pause_us
        with self._lock:
            self._paused[key] = max(until, self._paused.get(key, 0))

    def _window(self, key: str, oldest: int) -> dict[int, int]:
        """``key``'s buckets from ``oldest`` on; older ones are dropped, and so is an empty key."""
        buckets = {b: n for b, n in self._buckets.pop(key, {}).items() if b >= oldest and n}
        if buckets:
            self._buckets[key] = buckets
        return buckets


_local = _LocalQuotas()
