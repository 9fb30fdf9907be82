"""Waiting for something with a deadline, never a fixed sleep; and the error for a broken bench."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class BenchError(Exception):
    """The bench itself broke (a run failed, a process died, a deadline passed): exit non-zero.
    A missed target is not one of these."""


class Deadline:
    """``seconds`` from now, for waiting on ``what``."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise BenchError(f"timed out after {self.seconds:g} s waiting for {self.what}")


def poll(
    predicate: Callable[[], T | None],
    deadline: Deadline,
    *,
    interval: float = 0.05,
    alive: Callable[[], None] | None = None,
) -> T:
    """The first truthy value of ``predicate()``, polled every ``interval`` seconds; raise
    BenchError once ``deadline`` passes, or as soon as ``alive()`` (a liveness check of the
    processes doing the work) raises."""
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None:
            alive()
        deadline.check()
        time.sleep(interval)
