"""agentsite/breaker.py: the circuit breaker of tools and model routes, on real Redis and on
its in-process fallback.

Most tests run twice, once against the Redis of ``settings.REDIS_URL`` and once against the
in-process fallback (``REDIS_URL = ""``), so that both keep the same semantics. Each test uses
its own tool name, so tests never see each other's circuits.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agentsite import breaker, rediskeys
from harness.polling import poll

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
# Cooldowns and windows of a fraction of a second: the breaker counts in milliseconds (Redis
# TIME), and each test waits out a few of them.
FAILURES, WINDOW, COOLDOWN = 3, 5, 0.5


def redis_url(settings: Any) -> str:
    if not settings.REDIS_URL:
        pytest.skip("needs Redis: run with CELERY_BROKER_URL=redis://...")
    return str(settings.REDIS_URL)


@pytest.fixture
def small(settings: Any) -> Any:
    settings.AGENTSITE_BREAKER_FAILURES = FAILURES
    settings.AGENTSITE_BREAKER_WINDOW = WINDOW
    settings.AGENTSITE_BREAKER_COOLDOWN = COOLDOWN
    return settings


@pytest.fixture(params=["redis", "local"])
def backend(request: pytest.FixtureRequest, small: Any) -> str:
    if request.param == "local":
        small.REDIS_URL = ""
    else:
        redis_url(small)
    return str(request.param)


@pytest.fixture
def tool(backend: str) -> Iterator[str]:
    name = f"test-breaker-{uuid.uuid4().hex[:12]}"
    yield name
    breaker.reset(name)


@pytest.fixture
def redis_tool(small: Any) -> Iterator[str]:
    """A tool name for the tests that only make sense with Redis."""
    redis_url(small)
    name = f"test-breaker-{uuid.uuid4().hex[:12]}"
    yield name
    breaker.reset(name)


def trip(tool: str) -> breaker.BreakerState:
    state = None
    for _ in range(FAILURES):
        state = breaker.record_failure(tool)
    assert state is not None and state.state == breaker.OPEN
    return state


def wait_half_open(tool: str) -> breaker.BreakerState:
    return poll(
        lambda: s if (s := breaker.status(tool)).state == breaker.HALF_OPEN else None,
        timeout=COOLDOWN + 5,
        what=f"{tool} to turn half-open",
    )


def take_probe(tool: str) -> None:
    trip(tool)
    wait_half_open(tool)
    state = breaker.before_call(tool)
    assert state.allowed and state.probe and state.state == breaker.HALF_OPEN


# --- Opening --------------------------------------------------------------------------------


def test_a_fresh_tool_is_closed_and_allowed(tool: str) -> None:
    assert breaker.status(tool) == breaker.BreakerState(tool, breaker.CLOSED, 0, 0.0)
    state = breaker.before_call(tool)
    assert state.allowed and state.state == breaker.CLOSED and not state.probe


def test_opens_after_n_failures_within_the_window_and_not_before(tool: str) -> None:
    for count in range(1, FAILURES):
        state = breaker.record_failure(tool)
        assert (state.state, state.failures, state.retry_in) == (breaker.CLOSED, count, 0.0)
        assert breaker.before_call(tool).allowed
    assert breaker.status(tool).failures == FAILURES - 1

    state = breaker.record_failure(tool)
    assert state.state == breaker.OPEN
    assert state.failures == FAILURES
    assert 0 < state.retry_in <= COOLDOWN
    seen = breaker.status(tool)
    assert seen.state == breaker.OPEN and seen.failures == FAILURES
    assert 0 < seen.retry_in <= COOLDOWN


def test_an_open_circuit_refuses_calls(tool: str) -> None:
    trip(tool)
    for _ in range(5):
        state = breaker.before_call(tool)
        assert not state.allowed
        assert state.state == breaker.OPEN and not state.probe
        assert 0 < state.retry_in <= COOLDOWN


def test_failures_older_than_the_window_do_not_count(tool: str, settings: Any) -> None:
    settings.AGENTSITE_BREAKER_WINDOW = 0.5
    for _ in range(FAILURES - 1):
        breaker.record_failure(tool)
    assert breaker.status(tool).failures == FAILURES - 1
    poll(lambda: breaker.status(tool).failures == 0, timeout=5, what="the failures to age out")

    # Two fresh failures after two stale ones: still closed (a fixed count would have opened).
    for count in range(1, FAILURES):
        state = breaker.record_failure(tool)
        assert (state.state, state.failures) == (breaker.CLOSED, count)
    assert breaker.record_failure(tool).state == breaker.OPEN


def test_the_window_slides_each_failure_ages_out_on_its_own(tool: str, settings: Any) -> None:
    settings.AGENTSITE_BREAKER_WINDOW = 1
    breaker.record_failure(tool)
    # Not waiting for an outcome, only spacing the two failures' timestamps half a window apart.
    time.sleep(0.5)
    breaker.record_failure(tool)
    # The first ages out while the second still counts (a counter expiring a window after the
    # last failure would drop from 2 straight to 0).
    poll(lambda: breaker.status(tool).failures == 1, timeout=5, what="the first failure to age")

    state = breaker.record_failure(tool)
    assert (state.state, state.failures) == (breaker.CLOSED, 2)
    assert breaker.record_failure(tool).state == breaker.OPEN


def test_failures_while_open_are_counted_but_do_not_extend_the_cooldown(tool: str) -> None:
    trip(tool)
    poll(
        lambda: breaker.status(tool).retry_in < COOLDOWN / 2,
        timeout=COOLDOWN + 5,
        what="half the cooldown to pass",
    )
    later = breaker.record_failure(tool)
    assert later.state == breaker.OPEN
    assert later.failures == FAILURES + 1
    assert 0 < later.retry_in < COOLDOWN / 2
    assert breaker.status(tool).retry_in < COOLDOWN / 2


def test_concurrent_failures_are_counted_atomically(tool: str, settings: Any) -> None:
    settings.AGENTSITE_BREAKER_FAILURES = 40
    results: list[breaker.BreakerState] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def fail() -> None:
        start.wait()
        for _ in range(5):
            state = breaker.record_failure(tool)
            with lock:
                results.append(state)

    threads = [threading.Thread(target=fail) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(s.failures for s in results) == list(range(1, 41))
    opened_by = [s for s in results if s.failures == 40]
    assert [s.state for s in opened_by] == [breaker.OPEN]
    assert all(s.state == breaker.CLOSED for s in results if s.failures < 40)
    assert breaker.status(tool).state == breaker.OPEN


# --- Half-open and the probe -------------------------------------------------------------------


def test_after_the_cooldown_exactly_one_concurrent_caller_gets_the_probe(tool: str) -> None:
    trip(tool)
    assert not breaker.before_call(tool).allowed
    half = wait_half_open(tool)
    assert half.retry_in == 0 and not half.allowed
    for _ in range(3):  # status() is read-only: it never takes the probe
        assert breaker.status(tool).state == breaker.HALF_OPEN

    callers = 32
    start = threading.Barrier(callers)
    results: list[breaker.BreakerState] = []
    lock = threading.Lock()

    def call() -> None:
        start.wait()
        state = breaker.before_call(tool)
        with lock:
            results.append(state)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(results) == callers
    allowed = [s for s in results if s.allowed]
    assert len(allowed) == 1
    assert allowed[0].probe and allowed[0].state == breaker.HALF_OPEN
    refused = [s for s in results if not s.allowed]
    assert all(s.state == breaker.HALF_OPEN and not s.probe for s in refused)
    # A refused caller learns how long the probe may hold the circuit at most.
    assert all(0 < s.retry_in <= COOLDOWN for s in refused)
    assert not breaker.before_call(tool).allowed  # the probe has not reported yet


def test_a_successful_probe_closes_the_circuit_and_clears_the_failures(tool: str) -> None:
    take_probe(tool)
    breaker.record_success(tool)

    assert breaker.status(tool) == breaker.BreakerState(tool, breaker.CLOSED, 0, 0.0)
    assert breaker.before_call(tool).allowed
    # The count starts again from zero: N-1 new failures leave it closed.
    for _ in range(FAILURES - 1):
        assert breaker.record_failure(tool).state == breaker.CLOSED
    assert breaker.record_failure(tool).state == breaker.OPEN


def test_a_failed_probe_reopens_the_circuit_for_another_cooldown(tool: str) -> None:
    take_probe(tool)
    state = breaker.record_failure(tool)

    assert state.state == breaker.OPEN
    assert COOLDOWN / 2 < state.retry_in <= COOLDOWN
    refused = breaker.before_call(tool)
    assert not refused.allowed and refused.state == breaker.OPEN
    wait_half_open(tool)
    assert breaker.before_call(tool).probe  # and then a new probe may go


def test_a_probe_that_never_reports_does_not_wedge_the_circuit(tool: str) -> None:
    take_probe(tool)  # ... and its worker dies: no record_success/record_failure
    assert not breaker.before_call(tool).allowed

    state = poll(
        lambda: s if (s := breaker.before_call(tool)).allowed else None,
        timeout=COOLDOWN + 5,
        what="the lost probe's lease to expire",
    )
    assert state.probe and state.state == breaker.HALF_OPEN
    assert not breaker.before_call(tool).allowed  # again exactly one


def test_success_in_the_closed_state_does_not_reset_the_window(tool: str) -> None:
    for _ in range(FAILURES - 1):
        breaker.record_failure(tool)
    breaker.record_success(tool)
    assert breaker.status(tool).failures == FAILURES - 1
    assert breaker.record_failure(tool).state == breaker.OPEN


def test_success_while_open_is_ignored(tool: str) -> None:
    trip(tool)
    breaker.record_success(tool)  # a call that began before the circuit opened
    state = breaker.status(tool)
    assert state.state == breaker.OPEN and state.failures == FAILURES
    assert not breaker.before_call(tool).allowed


# --- Operator actions and the admin ----------------------------------------------------------


def test_reset_closes_an_open_circuit(tool: str) -> None:
    trip(tool)
    breaker.reset(tool)

    assert breaker.status(tool) == breaker.BreakerState(tool, breaker.CLOSED, 0, 0.0)
    assert breaker.before_call(tool).allowed
    for _ in range(FAILURES - 1):
        assert breaker.record_failure(tool).state == breaker.CLOSED


def test_reset_closes_a_half_open_circuit_with_a_probe_out(tool: str) -> None:
    take_probe(tool)
    breaker.reset(tool)
    state = breaker.before_call(tool)
    assert state.allowed and state.state == breaker.CLOSED and not state.probe


def test_all_states_reports_each_tool(tool: str) -> None:
    closed, opened, half = f"{tool}-closed", f"{tool}-open", f"{tool}-half"
    try:
        breaker.record_failure(closed)
        trip(half)
        wait_half_open(half)
        trip(opened)

        states = breaker.all_states([closed, opened, half, closed])

        assert list(states) == [closed, opened, half]
        assert states[closed] == breaker.BreakerState(closed, breaker.CLOSED, 1, 0.0)
        assert states[opened].state == breaker.OPEN and states[opened].failures == FAILURES
        assert 0 < states[opened].retry_in <= COOLDOWN
        assert states[half] == breaker.BreakerState(half, breaker.HALF_OPEN, FAILURES, 0.0)
        assert breaker.before_call(half).probe  # all_states did not take it
        assert breaker.all_states([]) == {}
    finally:
        for name in (closed, opened, half):
            breaker.reset(name)


# --- Redis specifics ----------------------------------------------------------------------------


def test_redis_keys_are_namespaced_and_all_expire(redis_tool: str, small: Any) -> None:
    import redis

    client = redis.Redis.from_url(small.REDIS_URL)
    take_probe(redis_tool)

    prefix = rediskeys.key(f"breaker:{redis_tool}")
    keys = sorted(k.decode() for k in client.scan_iter(f"{prefix}:*"))
    assert keys == [f"{prefix}:failures", f"{prefix}:open", f"{prefix}:probe"]
    for key in keys:
        ttl: Any = client.pttl(key)
        assert ttl > 0, f"{key} has no TTL"

    breaker.reset(redis_tool)
    assert list(client.scan_iter(f"{prefix}:*")) == []


CHILD = """
import json, sys
from agentsite import breaker
tool, action = sys.argv[1], sys.argv[2]
if action == "fail":
    for _ in range(int(sys.argv[3])):
        state = breaker.record_failure(tool)
    print(json.dumps({"state": state.state, "failures": state.failures}), flush=True)
elif action == "probe":
    breaker.status("warm-up")  # connect before the start signal
    print("ready", flush=True)
    sys.stdin.readline()
    state = breaker.before_call(tool)
    print(json.dumps({"allowed": state.allowed, "state": state.state}), flush=True)
"""


def child_env(settings: Any) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentsite.settings",
        "REDIS_URL": redis_url(settings),
        "AGENTSITE_BREAKER_FAILURES": str(FAILURES),
        "AGENTSITE_BREAKER_WINDOW": str(WINDOW),
        "AGENTSITE_BREAKER_COOLDOWN": "30",  # a child's probe lease outlives the test
    }


def test_state_is_shared_across_processes(redis_tool: str, small: Any) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, redis_tool, "fail", str(FAILURES)],
        cwd=ROOT,
        env=child_env(small),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"state": "open", "failures": FAILURES}

    state = breaker.status(redis_tool)
    assert state.state == breaker.OPEN and state.failures == FAILURES
    assert not breaker.before_call(redis_tool).allowed


def test_exactly_one_process_gets_the_probe(redis_tool: str, small: Any) -> None:
    trip(redis_tool)
    wait_half_open(redis_tool)

    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, redis_tool, "probe"],
            cwd=ROOT,
            env=child_env(small),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            assert line == "ready", child.stderr.read() if child.stderr else line
        for child in children:  # all at once: they race for the probe
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        answers = []
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            answers.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    assert all(a["state"] == "half_open" for a in answers)
    assert sum(a["allowed"] for a in answers) == 1
    assert not breaker.before_call(redis_tool).allowed  # nor this process, while it is out


# --- Without Redis ----------------------------------------------------------------------------


def test_the_in_process_fallback_does_not_touch_redis(settings: Any, small: Any) -> None:
    url = redis_url(settings)
    name = f"test-breaker-{uuid.uuid4().hex[:12]}"
    settings.REDIS_URL = ""
    try:
        trip(name)
        assert breaker.status(name).state == breaker.OPEN
        settings.REDIS_URL = url
        assert breaker.status(name).state == breaker.CLOSED  # Redis never heard of it
        settings.REDIS_URL = ""
        assert breaker.status(name).state == breaker.OPEN
    finally:
        settings.REDIS_URL = ""
        breaker.reset(name)


def test_an_unreachable_redis_allows_calls_and_does_not_raise(
    small: Any, caplog: pytest.LogCaptureFixture
) -> None:
    small.REDIS_URL = "redis://127.0.0.1:1/0"
    name = f"test-breaker-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agentsite.breaker"):
        for _ in range(FAILURES + 2):
            state = breaker.record_failure(name)
            assert state.state == breaker.CLOSED
        state = breaker.before_call(name)
        assert state.allowed and state.state == breaker.CLOSED
        assert breaker.status(name).state == breaker.CLOSED
        assert breaker.all_states([name])[name].allowed
        breaker.record_success(name)
        breaker.reset(name)
    assert time.monotonic() - started < 10  # no seconds of backoff per call

    # One warning: after the first error this process leaves Redis alone for a few seconds.
    warnings = [r for r in caplog.records if r.name == "agentsite.breaker"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "allowing calls" in warnings[0].getMessage()


def test_an_unreachable_redis_is_tried_again_after_a_pause(
    small: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(breaker._fail_open, "rest_for", 0.0)
    small.REDIS_URL = "redis://127.0.0.1:2/0"
    name = f"test-breaker-{uuid.uuid4().hex[:12]}"
    with caplog.at_level(logging.WARNING, logger="agentsite.breaker"):
        for _ in range(3):
            assert breaker.before_call(name).allowed
    assert len([r for r in caplog.records if r.name == "agentsite.breaker"]) == 3
