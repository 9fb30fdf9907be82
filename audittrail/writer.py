"""Writing the audit trail. Call inside the transaction of the change being recorded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import transaction

from agentsite import metrics
from agentsite.redaction import redact

from .models import AuditEvent

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from agents.models import Run


@dataclass(frozen=True)
class Actor:
    """Who did it: the system (engine, reconciler, cli), a user, or an agent (its model route)."""

    type: str
    name: str

    @classmethod
    def system(cls, name: str) -> Actor:
        return cls(AuditEvent.ActorType.SYSTEM, name)

    @classmethod
    def agent(cls, route: str) -> Actor:
        return cls(AuditEvent.ActorType.AGENT, route)

    @classmethod
    def user(cls, user: User | None, *, otherwise: str = "cli") -> Actor:
        if user is None:
            return cls.system(otherwise)
        return cls(AuditEvent.ActorType.USER, user.get_username())


ENGINE = Actor.system("engine")


def record(
    action: str,
    *,
    run: Run | None = None,
    step_index: int | None = None,
    by: Actor = ENGINE,
    payload: dict[str, Any] | None = None,
) -> None:
    event = AuditEvent(
        action=action,
        run=run,
        step_index=step_index,
        actor_type=by.type,
        actor=by.name,
        trace_id=run.trace_id if run is not None else "",
        payload=redact(payload or {}),
    )
    pending = getattr(_batch, "events", None)
    if pending is not None:
        pending.append(event)
    else:
        event.save()
    # The metrics count what the audit trail records, once it is committed (agentsite.metrics).
    if metrics.counts(action):
        agent_id = run.agent_id if run is not None else None
        facts = payload or {}
        transaction.on_commit(lambda: metrics.observe(action, agent_id, facts))


# Per thread, hence per greenlet under gevent's monkey patching.
_batch = threading.local()


@contextmanager
def batched() -> Iterator[None]:
    """Write the events recorded in the block as one INSERT when it ends, in order. Use it just
    inside the ``transaction.atomic()`` of the change, so they commit (or roll back) with it;
    a step that records two or three events spares the round trips. Nested blocks join the
    outermost one; an exception discards the events with the transaction."""
    if getattr(_batch, "events", None) is not None:
        yield
        return
    _batch.events = []
    try:
        yield
        events = _batch.events
    finally:
        _batch.events = None
    if events:
        AuditEvent.objects.bulk_create(events)
