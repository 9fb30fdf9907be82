"""ride_out_outage: a write already paid for is tried again through a database outage, but
never past what is left of the task's hard time limit."""

from __future__ import annotations

import pytest
from django.db import OperationalError

from agentsite import pools


def flaky(failures: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def write() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise OperationalError("the database system is shutting down")
        return "recorded"

    return calls, write


def test_a_write_is_retried_until_the_database_is_back(monkeypatch):
    monkeypatch.setattr(pools, "RIDE_OUT_DELAYS", (0.01, 0.01, 0.01))
    calls, write = flaky(2)
    assert pools.ride_out_outage(write, "test", within=10) == "recorded"
    assert len(calls) == 3


def test_it_gives_up_when_the_next_wait_would_pass_the_deadline(monkeypatch):
    monkeypatch.setattr(pools, "RIDE_OUT_DELAYS", (0.01, 5.0))
    calls, write = flaky(5)
    with pytest.raises(OperationalError):
        pools.ride_out_outage(write, "test", within=1)
    assert len(calls) == 2  # tried, waited 0.01 s, tried; a 5 s wait would pass the deadline


def test_the_last_failure_is_raised_when_the_outage_outlasts_every_wait(monkeypatch):
    monkeypatch.setattr(pools, "RIDE_OUT_DELAYS", (0.01, 0.01))
    calls, write = flaky(10)
    with pytest.raises(OperationalError):
        pools.ride_out_outage(write, "test", within=10)
    assert len(calls) == 3
