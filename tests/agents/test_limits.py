"""Model quotas (agents/providers/quotas.py) on the real Redis, and the in-process fallback.

An admission's time is known only between the clock readings taken before and after its call:
a single reading after the call is late by however long the thread waited to run again (tens
of ms with 20 threads), which can crowd more than the limit into one window that Redis never
admitted. So the window checks fail only on admissions that certainly fell inside one window
(see ``assert_never_over``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import selectors
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from agents.providers import quotas
from agents.providers.quotas import Quota, acquire, pause, settle

# The suite's Redis (make test: the test broker's database; its keys under the suite's prefix).
REDIS_URL = settings.REDIS_URL
ROOT = Path(__file__).resolve().parents[2]
LONG = 60.0  # a window nothing leaves during a test
BUCKET = 1.0 / quotas.BUCKETS  # the bucket of a one-second window

# (clock before the call, clock after it, units) of one admission
Admission = tuple[float, float, int]


@pytest.fixture(params=["redis", "local"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis" and not REDIS_URL:
        pytest.skip("needs Redis: run with `make test`")
    with override_settings(REDIS_URL=REDIS_URL if request.param == "redis" else ""):
        yield request.param


@pytest.fixture
def key() -> str:
    return f"test:{uuid.uuid4().hex}"


def assert_never_over(admissions: list[Admission], window: float, limit: int) -> None:
    """No set of admissions that certainly fell within ``[start, start + window)`` exceeds
    ``limit``. Each admission happened between its two clock readings; for each possible start
    (an admission's first reading), count those that lie wholly inside."""
    for start, _, _ in admissions:
        inside = [(b, a, n) for b, a, n in admissions if b >= start and a < start + window]
        assert sum(n for _, _, n in inside) <= limit, sorted(inside)


def hammer(key: str, *, limit: int, window: float, until: float, out: list[Admission]) -> None:
    """Acquire 1-3 units at a time until ``until``; retry soon after a refusal."""
    rng = random.Random()
    while time.monotonic() < until:
        cost = rng.randint(1, 3)
        before = time.monotonic()
        wait = acquire([Quota(key, limit, cost)], window=window)
        after = time.monotonic()
        if wait is None:
            out.append((before, after, cost))
        else:
            time.sleep(min(wait, rng.uniform(0, 0.02)))


def test_threads_never_exceed_the_limit_in_any_sliding_window(backend, key):
    window, limit, seconds = 1.0, 10, 3.0
    admissions: list[Admission] = []
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=hammer,
            args=(key,),
            kwargs={"limit": limit, "window": window, "until": until, "out": admissions},
        )
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 10)
    assert not any(thread.is_alive() for thread in threads)

    assert_never_over(admissions, window, limit)
    # ... and the limit is used, not starved: close to `limit` per window.
    assert sum(n for _, _, n in admissions) >= limit * (seconds - window)


_HAMMER_PROCESS = """
import json, sys, threading, time
import django
django.setup()
from tests.agents.test_limits import hammer
key, limit, window, seconds = sys.argv[1:]
print("ready", flush=True)
sys.stdin.readline()
admissions = []
until = time.monotonic() + float(seconds)
kwargs = {"limit": int(limit), "window": float(window), "until": until, "out": admissions}
threads = [threading.Thread(target=hammer, args=(key,), kwargs=kwargs) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(admissions), flush=True)
"""


def _read_line(process: subprocess.Popen[str], deadline: float) -> str:
    with selectors.DefaultSelector() as selector:
        assert process.stdout is not None
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            raise AssertionError("a hammering process did not start in time")
    return process.stdout.readline()


def test_processes_never_exceed_the_limit_in_any_sliding_window(key):
    """Three OS processes (four threads each) share one limit through Redis. time.monotonic
    is the system's CLOCK_MONOTONIC, so the processes' readings compare."""
    window, limit, seconds = 1.0, 10, 3.0
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentsite.settings",
        "DEBUG": "1",
        "REDIS_URL": REDIS_URL,
    }
    args = [key, str(limit), str(window), str(seconds)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER_PROCESS, *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        deadline = time.monotonic() + 20
        for process in processes:
            assert _read_line(process, deadline) == "ready\n", process.communicate()[1]
        admissions: list[Admission] = []
        for process in processes:  # all start together
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        for process in processes:
            out, err = process.communicate(timeout=seconds + 15)
            assert process.returncode == 0, err
            admissions.extend((before, after, n) for before, after, n in json.loads(out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert_never_over(admissions, window, limit)
    assert sum(n for _, _, n in admissions) >= limit * (seconds - window)


def test_all_or_nothing_across_quotas(backend, key):
    first, second = f"{key}:first", f"{key}:second"
    assert acquire([Quota(second, 5, 5)], window=LONG) is None

    # The second quota is full: the call is refused and takes nothing from the first.
    wait = acquire([Quota(first, 5, 3), Quota(second, 5, 1)], window=LONG)
    assert wait is not None and wait > 0
    assert acquire([Quota(first, 5, 5)], window=LONG) is None
    assert acquire([Quota(first, 5, 1)], window=LONG) is not None

    assert acquire([], window=LONG) is None
    with pytest.raises(ValueError, match="twice"):
        acquire([Quota(first, 5, 1), Quota(first, 9, 1)], window=LONG)


@pytest.mark.parametrize(("cost", "freed_by"), [(3, "first"), (5, "second")])
def test_wait_is_until_enough_old_buckets_leave_the_window(backend, key, cost, freed_by):
    """4 units, then 6 more 0.3 s later, fill a limit of 10. Room for 3 comes when the first 4
    leave the window; room for 5 only when the 6 leave too. The wait returned is never short
    (asking just before it ends is refused) and, past its jitter, not long either."""
    window, limit = 1.0, 10
    taken = {}
    for name, units, gap in (("first", 4, 0.3), ("second", 6, 0.0)):
        before = time.monotonic()
        assert acquire([Quota(key, limit, units)], window=window) is None
        taken[name] = (before, time.monotonic())
        time.sleep(gap)
    asked = time.monotonic()
    wait = acquire([Quota(key, limit, cost)], window=window)
    answered = time.monotonic()
    assert wait is not None

    # The bucket holding those units leaves at most two buckets after a window has passed.
    assert wait <= taken[freed_by][1] + window + 3 * BUCKET - asked
    jitter = min(wait / 10, BUCKET)  # at most this much was added to the true wait
    time.sleep(max(0.0, asked + wait - jitter - 0.05 - time.monotonic()))
    assert acquire([Quota(key, limit, cost)], window=window) is not None
    time.sleep(max(0.0, answered + wait - time.monotonic()))
    assert acquire([Quota(key, limit, cost)], window=window) is None


def test_a_cost_above_the_limit_takes_the_whole_window(backend, key):
    # Into an empty window: admitted, as the whole limit.
    assert acquire([Quota(key, 5, 50)], window=LONG) is None
    assert acquire([Quota(key, 5, 1)], window=LONG) is not None

    other = f"{key}:other"
    assert acquire([Quota(other, 5, 1)], window=1.0) is None
    # Not into a window holding anything: it waits for that to leave, not forever.
    wait = acquire([Quota(other, 5, 50)], window=1.0)
    assert wait is not None and wait <= 1.0 + 3 * BUCKET


def test_settle_corrects_the_estimate(backend, key):
    limit = 10
    assert acquire([Quota(key, limit, 4)], window=LONG) is None
    settle(key, 3, window=LONG)  # used 7, not 4: 3 left
    assert acquire([Quota(key, limit, 4)], window=LONG) is not None
    assert acquire([Quota(key, limit, 3)], window=LONG) is None  # 10 used

    settle(key, -5, window=LONG)  # 5 given back
    assert acquire([Quota(key, limit, 6)], window=LONG) is not None
    assert acquire([Quota(key, limit, 5)], window=LONG) is None

    # Giving back more than the window holds empties it, and no more: nothing goes below zero
    # to let a later call past the limit.
    settle(key, -1000, window=LONG)
    assert acquire([Quota(key, limit, 10)], window=LONG) is None
    assert acquire([Quota(key, limit, 1)], window=LONG) is not None

    # A settle on a quota nobody used leaves nothing behind to over-admit.
    fresh = f"{key}:fresh"
    settle(fresh, -7, window=LONG)
    assert acquire([Quota(fresh, limit, limit)], window=LONG) is None
    assert acquire([Quota(fresh, limit, 1)], window=LONG) is not None


def test_negative_settle_gives_back_the_oldest_units_first(backend, key):
    """5 units, 5 more half a window later, then 5 given back: taken from the older bucket.
    Once that bucket has left the window, the newer 5 still count, so only 5 fit (taking the
    give-back from the newer bucket would let 10 through while the newer call's units are
    still in the window)."""
    window, limit = 1.0, 10
    assert acquire([Quota(key, limit, 5)], window=window) is None
    first = time.monotonic()
    time.sleep(0.5)
    assert acquire([Quota(key, limit, 5)], window=window) is None
    settle(key, -5, window=window)
    assert acquire([Quota(key, limit, 6)], window=window) is not None
    time.sleep(max(0.0, first + window + 3 * BUCKET - time.monotonic()))
    assert acquire([Quota(key, limit, 6)], window=window) is not None
    assert acquire([Quota(key, limit, 5)], window=window) is None


def test_pause_refuses_every_acquire_touching_the_key_until_it_ends(backend, key):
    paused, other = f"{key}:paused", f"{key}:other"
    pause(paused, 0.5)
    pause(paused, 0.1)  # a shorter pause does not cut the longer one short
    started = time.monotonic()

    wait = acquire([Quota(other, 5, 1), Quota(paused, 5, 1)], window=LONG)
    assert wait is not None and 0.35 <= wait <= 0.5 * 1.1  # with at most 10% of jitter
    # Refused together: nothing was taken from the other quota, which is not paused itself.
    assert acquire([Quota(other, 5, 5)], window=LONG) is None

    time.sleep(max(0.0, started + 0.3 - time.monotonic()))
    assert acquire([Quota(paused, 5, 1)], window=LONG) is not None
    time.sleep(max(0.0, started + wait - time.monotonic()))
    assert acquire([Quota(paused, 5, 1)], window=LONG) is None


def test_redis_unreachable_fails_open_and_warns_once(key, caplog, monkeypatch):
    monkeypatch.setattr(quotas._fail_open, "warned_at", float("-inf"))
    with (
        override_settings(REDIS_URL="redis://127.0.0.1:1/0"),
        caplog.at_level(logging.WARNING, logger="agents.providers.quotas"),
    ):
        started = time.monotonic()
        for _ in range(3):
            assert acquire([Quota(key, 1, 1)], window=LONG) is None
        settle(key, -1, window=LONG)
        pause(key, 10)
        assert time.monotonic() - started < 1.0
    [warning] = [r.getMessage() for r in caplog.records if r.name == "agents.providers.quotas"]
    assert "failing open" in warning and "Connection refused" in warning


def test_bad_quotas_and_windows_are_refused():
    with pytest.raises(ValueError, match="limit"):
        Quota("k", 0, 1)
    with pytest.raises(ValueError, match="cost"):
        Quota("k", 1, -1)
    with pytest.raises(ValueError, match="window"):
        acquire([Quota("k", 1, 1)], window=0)
