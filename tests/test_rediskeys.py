"""agentsite/rediskeys.py: one client per URL and options, and the fail-open helper that the
breaker, the quotas and the request limits share."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from agentsite import rediskeys

LOGGER = "tests.rediskeys"


def failing(calls: list[int]) -> Any:
    def op() -> str:
        calls.append(1)
        raise RedisConnectionError("Connection refused")

    return op


def test_a_url_and_its_options_share_one_client(settings):
    url = "redis://127.0.0.1:1/0"
    assert rediskeys.client(url, timeout=1) is rediskeys.client(url, timeout=1)
    assert rediskeys.client(url, timeout=1) is not rediskeys.client(url, timeout=2)
    quick = rediskeys.client(url, timeout=1, retry_once=True)
    assert quick is not rediskeys.client(url, timeout=1)
    assert quick.get_retry().get_retries() == 1


def test_a_failure_answers_the_fallback_and_warns_with_the_context(caplog):
    guard = rediskeys.FailOpen(logging.getLogger(LOGGER), "off (%s %s): %s")
    assert guard.call(lambda: "answer", "fallback", "x", "y") == "answer"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert guard.call(failing([]), "fallback", "acquire", "k") == "fallback"
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.getMessage() == "off (acquire k): Connection refused"


def test_only_the_errors_named_fail_open():
    guard = rediskeys.FailOpen(logging.getLogger(LOGGER), "off: %s")
    with pytest.raises(ValueError):
        guard.call(lambda: int("x"), None)
    lenient = rediskeys.FailOpen(logging.getLogger(LOGGER), "off: %s", errors=(Exception,))
    assert lenient.call(lambda: int("x"), "fallback") == "fallback"


def test_warn_every_logs_at_most_once_in_its_period(caplog):
    guard = rediskeys.FailOpen(logging.getLogger(LOGGER), "off: %s", warn_every=30.0)
    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert guard.call(failing(calls), None) is None
    assert len(calls) == 3  # Redis is asked every time...
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1  # ...and warned about once


def test_rest_for_leaves_redis_alone_after_a_failure_until_it_passes(settings, monkeypatch):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    clock = [100.0]
    monkeypatch.setattr(rediskeys.time, "monotonic", lambda: clock[0])
    guard = rediskeys.FailOpen(logging.getLogger(LOGGER), "off: %s", rest_for=5.0)
    calls: list[int] = []
    assert guard.call(failing(calls), "open") == "open"
    assert guard.call(failing(calls), "open") == "open"
    assert len(calls) == 1  # resting: not asked again
    clock[0] += 5.0
    assert guard.call(lambda: "answer", "open") == "answer"
    assert guard.call(lambda: "again", "open") == "again"  # a success ends the rest
