"""What the engine needs from the Celery pool it runs in.

Workers run the gevent pool (README, Performance): a model or tool call is a greenlet waiting on
a socket, so one process holds hundreds in flight. Two things prefork gave for free need care:

* Soft time limits. Prefork delivers ``SoftTimeLimitExceeded`` with a signal; gevent's pool
  only enforces the hard limit (a ``gevent.Timeout`` that ends the task with no chance to clean
  up). :func:`soft_time_limit` raises ``SoftTimeLimitExceeded`` in the greenlet itself, so the
  engine records a timed-out call exactly as under prefork. Under prefork (or outside a worker)
  it does nothing: the signal, if any, does the job.
* Database connections. A task that keeps its connection while it waits 500 ms on a model pins
  one of the pool's few connections for nothing; :func:`release_connection` hands it back to
  Django's connection pool before the wait (the next query takes one again, in microseconds).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.db import InterfaceError, OperationalError, connection, connections

T = TypeVar("T")
logger = logging.getLogger(__name__)

# Waits between tries of a write that must not be thrown away (15.5 s in all, if the task's
# hard time limit leaves that much): longer than a Postgres restart usually takes.
RIDE_OUT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def green() -> bool:
    """True in a process gevent has monkey-patched (``celery worker -P gevent``)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("socket"))


@contextmanager
def soft_time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``SoftTimeLimitExceeded`` inside the block after ``seconds`` (gevent only)."""
    if not green() or seconds <= 0:
        yield
        return
    import gevent

    with gevent.Timeout(seconds, SoftTimeLimitExceeded(f"{what} exceeded {seconds:g}s")):
        yield


def release_connection() -> None:
    """Return this task's database connection to the pool before waiting on the network.

    Only with Django's connection pool and outside a transaction: closing an unpooled
    connection would cost a reconnect, and closing inside ``atomic`` would break it.
    """
    if connection.connection is None or connection.in_atomic_block:
        return
    if not connection.settings_dict.get("OPTIONS", {}).get("pool"):
        return
    connection.close()


@contextmanager
def connections_returned_if_killed() -> Iterator[None]:
    """Wrap a task body: if it is killed (gevent's hard time limit raises ``gevent.Timeout``, a
    BaseException after which Celery runs no ``task_postrun``), its database connections go back
    to the pool instead of being lost with the greenlet, which would shrink the pool for good."""
    try:
        yield
    except Exception:
        raise  # an ordinary failure: Celery's task_postrun handling still runs
    except BaseException:
        for conn in connections.all(initialized_only=True):
            conn.close()
        raise


def ride_out_outage(write: Callable[[], T], what: str, *, within: float) -> T:
    """Run ``write`` (its own transaction), trying again through a short database outage.

    For results already paid for (a model's answer, a tool's effect): a failed write would
    leave the step claimed until its lease expires and then redo it. Each retry takes a fresh
    connection. Gives up (raising the last failure) once the next wait would end past
    ``within`` seconds from now: the caller's task must still be inside its hard time limit.
    Must be called outside any transaction.
    """
    deadline = time.monotonic() + within
    for delay in RIDE_OUT_DELAYS:
        try:
            return write()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: database unavailable (%s); retrying in %gs", what, exc, delay)
            connection.close()
            time.sleep(delay)
    return write()
