"""A circuit breaker per tool or model route, shared by every worker process through Redis.

A tool's circuit is named after the tool; a model route's is ``model:<route>``
(agents.providers.routing).

States:

* ``closed``: calls go ahead. Each failure is counted in a sliding window of
  ``AGENTSITE_BREAKER_WINDOW`` seconds; ``AGENTSITE_BREAKER_FAILURES`` of them within it open
  the circuit. A success in the closed state does *not* reset the count: failures age out of
  the window on their own, so a tool failing intermittently but often still trips.
* ``open``: for ``AGENTSITE_BREAKER_COOLDOWN`` seconds every call is refused. Failures reported
  meanwhile (calls that started before it opened) are counted but do not extend the cooldown;
  successes are ignored.
* ``half_open``: the cooldown is over. Exactly one caller, across all processes, gets the probe
  (``SET NX`` with the cooldown as its TTL) and may call; the others are refused. A success
  closes the circuit and clears the count; a failure re-opens it for another cooldown. A probe
  that never reports (its worker was killed) holds the probe only until its TTL runs out; then
  the next caller gets a new probe. Any success or failure reported in this state decides, not
  only the probe's (the API carries no probe token; a call that succeeded is evidence enough).

Redis keys, all with TTLs (``<tool>`` is the circuit's name):

* ``agentsite:breaker:<tool>:failures``: sorted set of failures scored by Redis time in ms;
  expires a window after the last failure.
* ``agentsite:breaker:<tool>:open``: the time (ms) the cooldown ends. Present means open (before
  that time) or half-open (after it). It expires ``_FORGET_AFTER`` seconds after the cooldown:
  a half-open circuit that nobody probes for that long is forgotten (closed).
* ``agentsite:breaker:<tool>:probe``: the half-open probe's lease, TTL the cooldown.

Every transition is one Lua script, using the Redis server's clock so that workers on different
hosts agree on time. ``status`` and ``all_states`` only read and never take the probe.

Without Redis (``REDIS_URL`` empty, the embedded dev mode) the breaker is an in-process,
thread-safe implementation with the same semantics, so its state is then *per process*: each
worker process counts its own failures and opens its own circuits. If Redis is configured but
fails (down, timing out), the breaker fails open: calls are allowed, the failure is logged as a
warning, and nothing is raised to the caller; a Redis blip must never block every tool. The
process then leaves Redis alone for a few seconds (``_fail_open.rest_for``, allowing every
call), so a black-holed Redis does not add its timeouts to each tool call.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.conf import settings

from . import rediskeys

logger = logging.getLogger(__name__)
R = TypeVar("R")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# A half-open circuit (cooldown over, no probe has decided) is forgotten this long after its
# cooldown ended, so that no key lingers forever; the next failures open it again if need be.
_FORGET_AFTER = 3600


@dataclass(frozen=True)
class BreakerState:
    """A tool's circuit as one caller saw it.

    ``retry_in`` is the seconds until a probe may go: the rest of the cooldown when ``open``,
    the rest of the in-flight probe's lease when ``half_open`` and a probe is out (an upper
    bound: the probe may report sooner), else 0. ``probe`` is True only in what
    ``before_call`` returned to the one caller that got the half-open probe.
    """

    tool: str
    state: str
    failures: int
    retry_in: float
    probe: bool = False

    @property
    def allowed(self) -> bool:
        """Whether the call may go ahead: the circuit is closed, or this caller is the probe."""
        return self.state == CLOSED or self.probe


def _closed(tool: str) -> BreakerState:
    return BreakerState(tool=tool, state=CLOSED, failures=0, retry_in=0.0)


def _config() -> tuple[int, float, float]:
    """(failures that open, window seconds, cooldown seconds), read now so tests may override."""
    return (
        max(1, int(settings.AGENTSITE_BREAKER_FAILURES)),
        max(0.001, float(settings.AGENTSITE_BREAKER_WINDOW)),
        max(0.001, float(settings.AGENTSITE_BREAKER_COOLDOWN)),
    )


# --- Redis -------------------------------------------------------------------------------------

# KEYS: failures, open, probe. ARGV: window ms, cooldown ms, threshold, forget-after ms, then
# per script: check -> "1" to take the probe if free; failure -> a unique member for the set.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(n) return string.format('%.0f', n) end
local window, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2])
local threshold, forget = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
"""

# status (ARGV[5] == "0") and before_call (ARGV[5] == "1").
_CHECK = (
    _PRELUDE
    + """
local failures = redis.call('ZCOUNT', KEYS[1], '(' .. num(now - window), '+inf')
local ends = tonumber(redis.call('GET', KEYS[2]))
if not ends then return {'closed', failures, 0, 0} end
if now < ends then return {'open', failures, ends - now, 0} end
if ARGV[5] == '1' and redis.call('SET', KEYS[3], num(now), 'NX', 'PX', cooldown) then
  return {'half_open', failures, 0, 1}
end
local lease = redis.call('PTTL', KEYS[3])
if lease < 0 then lease = 0 end
return {'half_open', failures, lease, 0}
"""
)

_FAILURE = (
    _PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now - window))
redis.call('ZADD', KEYS[1], num(now), ARGV[5])
redis.call('PEXPIRE', KEYS[1], window)
local failures = redis.call('ZCARD', KEYS[1])
local ends = tonumber(redis.call('GET', KEYS[2]))
if ends and now < ends then
  return {'open', failures, ends - now, 0}
end
if ends or failures >= threshold then
  redis.call('SET', KEYS[2], num(now + cooldown), 'PX', cooldown + forget)
  redis.call('DEL', KEYS[3])
  return {'open', failures, cooldown, 0}
end
return {'closed', failures, 0, 0}
"""
)

_SUCCESS = (
    _PRELUDE
    + """
local ends = tonumber(redis.call('GET', KEYS[2]))
if ends and now >= ends then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return 1
end
return 0
"""
)


@dataclass(frozen=True)
class _Redis:
    client: Any
    check: Any
    failure: Any
    success: Any


def _redis() -> _Redis:
    """The client of ``REDIS_URL`` and the scripts on it: one quick retry, not redis-py's
    seconds of backoff, since the breaker is asked on every call."""
    return _Redis(
        client=rediskeys.client(timeout=1, retry_once=True),
        check=rediskeys.script(_CHECK, timeout=1, retry_once=True),
        failure=rediskeys.script(_FAILURE, timeout=1, retry_once=True),
        success=rediskeys.script(_SUCCESS, timeout=1, retry_once=True),
    )


# After a Redis error this process skips Redis (allowing calls) for a few seconds, so that a
# Redis that is down or black-holed does not add its timeouts to every tool call.
_fail_open = rediskeys.FailOpen(
    logger,
    "circuit breaker unavailable (%s %s), allowing calls for the next %ss: %s",
    rest_for=5.0,
)


def _keys(tool: str) -> list[str]:
    prefix = rediskeys.key(f"breaker:{tool}")
    return [f"{prefix}:failures", f"{prefix}:open", f"{prefix}:probe"]


def _args(*extra: str) -> list[Any]:
    threshold, window, cooldown = _config()
    return [
        max(1, round(window * 1000)),
        max(1, round(cooldown * 1000)),
        threshold,
        _FORGET_AFTER * 1000,
        *extra,
    ]


def _state(tool: str, reply: Any) -> BreakerState:
    state, failures, retry_ms, probe = reply
    return BreakerState(
        tool=tool,
        state=state.decode() if isinstance(state, bytes) else str(state),
        failures=int(failures),
        retry_in=max(0.0, int(retry_ms) / 1000),
        probe=bool(int(probe)),
    )


def _on_redis(action: str, tool: str, op: Callable[[_Redis], R], fallback: R) -> R:
    """``op`` on Redis, or ``fallback`` (calls allowed) if Redis fails or failed moments ago."""
    return _fail_open.call(lambda: op(_redis()), fallback, action, tool, _fail_open.rest_for)


# --- In-process fallback -----------------------------------------------------------------------


@dataclass
class _Circuit:
    failures: deque[float] = field(default_factory=deque)
    ends: float | None = None  # monotonic time the cooldown ends; None when closed
    forget_at: float = 0.0
    probe_until: float = 0.0


class _Local:
    """The same state machine in this process only, for when there is no Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._circuits: dict[str, _Circuit] = {}

    def _get(self, tool: str, now: float, window: float) -> _Circuit:
        circuit = self._circuits.setdefault(tool, _Circuit())
        if circuit.ends is not None and now >= circuit.forget_at:
            circuit.ends = None
            circuit.probe_until = 0.0
        while circuit.failures and circuit.failures[0] <= now - window:
            circuit.failures.popleft()
        return circuit

    def _tidy(self, tool: str, circuit: _Circuit) -> None:
        if circuit.ends is None and not circuit.failures:
            self._circuits.pop(tool, None)

    def check(self, tool: str, *, take_probe: bool) -> BreakerState:
        _, window, cooldown = _config()
        with self._lock:
            now = time.monotonic()
            circuit = self._get(tool, now, window)
            failures = len(circuit.failures)
            try:
                if circuit.ends is None:
                    return BreakerState(tool, CLOSED, failures, 0.0)
                if now < circuit.ends:
                    return BreakerState(tool, OPEN, failures, circuit.ends - now)
                if take_probe and now >= circuit.probe_until:
                    circuit.probe_until = now + cooldown
                    return BreakerState(tool, HALF_OPEN, failures, 0.0, probe=True)
                return BreakerState(tool, HALF_OPEN, failures, max(0.0, circuit.probe_until - now))
            finally:
                self._tidy(tool, circuit)

    def failure(self, tool: str) -> BreakerState:
        threshold, window, cooldown = _config()
        with self._lock:
            now = time.monotonic()
            circuit = self._get(tool, now, window)
            circuit.failures.append(now)
            failures = len(circuit.failures)
            if circuit.ends is not None and now < circuit.ends:
                return BreakerState(tool, OPEN, failures, circuit.ends - now)
            if circuit.ends is not None or failures >= threshold:
                circuit.ends = now + cooldown
                circuit.forget_at = circuit.ends + _FORGET_AFTER
                circuit.probe_until = 0.0
                return BreakerState(tool, OPEN, failures, cooldown)
            return BreakerState(tool, CLOSED, failures, 0.0)

    def success(self, tool: str) -> None:
        _, window, _ = _config()
        with self._lock:
            now = time.monotonic()
            circuit = self._get(tool, now, window)
            if circuit.ends is not None and now >= circuit.ends:
                self._circuits.pop(tool, None)
            else:
                self._tidy(tool, circuit)

    def reset(self, tool: str) -> None:
        with self._lock:
            self._circuits.pop(tool, None)


_local = _Local()


# --- Public API --------------------------------------------------------------------------------


def status(tool: str) -> BreakerState:
    """The tool's circuit now, read-only: never takes the half-open probe."""
    return _check("status", tool, take_probe=False)


def before_call(tool: str) -> BreakerState:
    """Ask right before calling the tool; go ahead only if the result's ``allowed`` is True.

    Closed: allowed. Open: refused. Half-open: allowed for exactly one caller across all
    processes (the probe), which must then report with ``record_success``/``record_failure``.
    """
    return _check("before_call", tool, take_probe=True)


def _check(action: str, tool: str, *, take_probe: bool) -> BreakerState:
    if not settings.REDIS_URL:
        return _local.check(tool, take_probe=take_probe)
    probe = "1" if take_probe else "0"
    return _on_redis(
        action,
        tool,
        lambda r: _state(tool, r.check(keys=_keys(tool), args=_args(probe))),
        _closed(tool),
    )


def record_success(tool: str) -> None:
    """A call succeeded. Half-open: closes the circuit and clears the failures. Closed: the
    count is left to age out of the window. Open: ignored (the cooldown runs its course)."""
    if not settings.REDIS_URL:
        _local.success(tool)
        return
    _on_redis("record_success", tool, lambda r: r.success(keys=_keys(tool), args=_args()), None)


def record_failure(tool: str) -> BreakerState:
    """A call failed: count it. Reaching ``AGENTSITE_BREAKER_FAILURES`` within the window opens
    the circuit; a failure when half-open re-opens it for another cooldown. Returns the new
    state."""
    if not settings.REDIS_URL:
        return _local.failure(tool)
    member = uuid.uuid4().hex  # the failure's unique member in the sorted set
    return _on_redis(
        "record_failure",
        tool,
        lambda r: _state(tool, r.failure(keys=_keys(tool), args=_args(member))),
        _closed(tool),
    )


def reset(tool: str) -> None:
    """Operator action: close the circuit now and forget its failures. (With Redis down this
    logs a warning and does nothing; the breaker is allowing every call then anyway.)"""
    if not settings.REDIS_URL:
        _local.reset(tool)
        return
    _on_redis("reset", tool, lambda r: r.client.delete(*_keys(tool)), None)


def all_states(tools: Iterable[str]) -> dict[str, BreakerState]:
    """``status`` of many tools, in one round trip to Redis."""
    names = list(dict.fromkeys(tools))
    if not settings.REDIS_URL:
        return {name: _local.check(name, take_probe=False) for name in names}
    if not names:
        return {}

    def read(r: _Redis) -> dict[str, BreakerState]:
        pipe = r.client.pipeline(transaction=False)
        args = _args("0")
        for name in names:
            r.check(keys=_keys(name), args=args, client=pipe)
        replies = pipe.execute()
        return {name: _state(name, reply) for name, reply in zip(names, replies, strict=True)}

    return _on_redis("all_states", ", ".join(names), read, {n: _closed(n) for n in names})
