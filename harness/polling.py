"""Waiting for something with a deadline, never a fixed sleep; and the error when it fails."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class HarnessError(AssertionError):
    """What the harness started or waited for broke (a process died, a deadline passed): the
    bench and the chaos suite exit non-zero, a test fails. A missed bench target is not one."""


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
            raise HarnessError(f"timed out after {self.seconds:g}s waiting for {self.what}")


def poll(
    predicate: Callable[[], T | None],
    deadline: Deadline | None = None,
    *,
    timeout: float = 30.0,
    what: str = "",
    interval: float = 0.05,
    alive: Callable[[], None] | None = None,
) -> T:
    """The first truthy value of ``predicate()``, polled every ``interval`` seconds; raise
    HarnessError once ``deadline`` (or ``timeout`` seconds, waiting for ``what``) passes, or as
    soon as ``alive()`` (a liveness check of the processes doing the work) raises."""
    if deadline is None:
        deadline = Deadline(timeout, what or repr(predicate))
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None:
            alive()
        deadline.check()
        time.sleep(interval)
