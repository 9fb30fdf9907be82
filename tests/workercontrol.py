"""A remote-control command of the test suite's own workers (loaded with ``celery worker --include
tests.workercontrol``; never by a deployed worker).

A test's database is flushed with TRUNCATE when the test ends, which deadlocked with the
session's worker writing at the same moment. So before a flush the suite drains its workers
(tests/support/processes.py, WorkerProcess.drain): each forgets what it holds of the ended test (the
messages it reserved, the countdowns in its timer: revoked, so they are discarded when due) and
says how many tasks still execute; the suite waits until none does and empties the queues. The
worker goes on consuming: the next test's messages run as usual.

Consumers are not cancelled: kombu's Redis transport defers a cancel until its current BRPOP
returns, and a consumer re-added meanwhile is undone by it. Nor are messages dropped on
arrival: other processes (the demo's own worker, a module's workers) share the queues.
"""

from __future__ import annotations

from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import control_command
from celery.worker.request import Request


@control_command()
def agentsite_test_drain(state: Any) -> dict[str, Any]:
    """Revoke every message reserved (not yet started) or waiting for its countdown; say how
    many tasks still execute (call again until none does)."""
    waiting = set(worker_state.reserved_requests) - set(worker_state.active_requests)
    scheduled = [
        entry.entry.args[0]
        for entry in state.consumer.timer.schedule.queue
        if entry.entry.args and isinstance(entry.entry.args[0], Request)
    ]
    revoked = {request.id for request in [*waiting, *scheduled]}
    worker_state.revoked.update(revoked)
    return {"active": len(worker_state.active_requests), "revoked": len(revoked)}
