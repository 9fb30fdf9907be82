"""The open-stream count behind AGENTSITE_MAX_STREAMS_PER_KEY (agents.streamslots), against the
real Redis: leases that run out, leases renewed, release, and the per-process count without
Redis. Over HTTP, across API processes: tests/integration/test_stream_limits.py."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from agents import streamslots
from agentsite import rediskeys
from harness.polling import poll


@pytest.fixture
def caller() -> str:
    return f"key:test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def with_redis(settings):
    assert settings.REDIS_URL, "streams are counted in Redis: run with `make test`"
    return redis.Redis.from_url(settings.REDIS_URL)


def test_a_caller_at_the_cap_gets_no_slot_until_one_is_released(settings, with_redis, caller):
    settings.AGENTSITE_MAX_STREAMS_PER_KEY = 2
    first, second = streamslots.acquire(caller), streamslots.acquire(caller)
    assert first is not None and second is not None

    assert streamslots.acquire(caller) is None
    assert streamslots.acquire(f"{caller}-other") is not None  # another caller has its own

    streamslots.release(first)
    assert streamslots.acquire(caller) is not None


def test_the_count_is_a_bounded_key_under_the_deployments_prefix(settings, with_redis, caller):
    settings.AGENTSITE_MAX_STREAMS_PER_KEY = 5
    slot = streamslots.acquire(caller)
    assert slot is not None

    name = rediskeys.key(f"streams:{caller}")
    assert name.startswith(settings.AGENTSITE_REDIS_KEY_PREFIX + "agentsite:")
    assert with_redis.zcard(name) == 1
    assert 0 < with_redis.pttl(name) <= streamslots.LEASE_SECONDS * 1000
    streamslots.release(slot)
    assert not with_redis.exists(name)  # the last one gone, the key with it


def test_a_slot_whose_lease_ran_out_is_free_again(settings, with_redis, caller, monkeypatch):
    """What happens to the slots of a process that died: nobody renews them."""
    settings.AGENTSITE_MAX_STREAMS_PER_KEY = 1
    monkeypatch.setattr(streamslots, "LEASE_SECONDS", 0.3)
    assert streamslots.acquire(caller) is not None
    assert streamslots.acquire(caller) is None

    poll(lambda: streamslots.acquire(caller), timeout=5, what="the lease to run out")


def test_a_renewed_slot_outlives_its_first_lease(settings, with_redis, caller, monkeypatch):
    settings.AGENTSITE_MAX_STREAMS_PER_KEY = 1
    monkeypatch.setattr(streamslots, "LEASE_SECONDS", 0.5)
    slot = streamslots.acquire(caller)
    assert slot is not None

    until = time.monotonic() + 1.5  # three leases
    while time.monotonic() < until:
        streamslots.renew(slot)
        assert streamslots.acquire(caller) is None
        time.sleep(0.1)

    streamslots.release(slot)
    assert streamslots.acquire(caller) is not None


def test_without_redis_the_cap_holds_per_process(settings, caller):
    settings.REDIS_URL = ""
    settings.AGENTSITE_MAX_STREAMS_PER_KEY = 2
    first, second = streamslots.acquire(caller), streamslots.acquire(caller)
    assert first is not None and second is not None
    assert streamslots.acquire(caller) is None

    streamslots.release(second)
    third = streamslots.acquire(caller)
    assert third is not None
    for slot in (first, third):
        streamslots.release(slot)
    assert caller not in streamslots._local


def test_a_cap_of_zero_counts_nothing(settings, with_redis, caller):
    settings.AGENTSITE_MAX_STREAMS_PER_KEY = 0
    slots = [streamslots.acquire(caller) for _ in range(30)]
    assert all(slot is not None and not slot.counted for slot in slots)
    assert not with_redis.exists(rediskeys.key(f"streams:{caller}"))
