"""Recording a tool's side effect in the outbox, at most once per call.

A side-effecting tool does not act on the world directly: it writes what should happen to the
``OutboxMessage`` table under the call's idempotency key (run, step, call id), and a relay
delivers it. However often the call is retried or redelivered (a worker killed mid-call, a lost
acknowledgement), the key is unique, so the side effect is recorded exactly once.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.db import IntegrityError, transaction

from agents.dispatch import outbox_relay_on_commit
from agents.models import Run

from .models import OutboxMessage
from .registry import ToolContext, ToolError


def record(
    ctx: ToolContext, *, kind: str, destination: str = "", payload: dict[str, Any]
) -> tuple[OutboxMessage, bool]:
    """Write the call's side effect once; returns (message, created).

    On a retry of the same call the existing row is returned unchanged (``created`` False), even
    if the arguments differ: what was recorded first is what happens.
    """
    found = OutboxMessage.objects.filter(idempotency_key=ctx.idempotency_key).first()
    if found is not None:
        return found, False
    try:
        with transaction.atomic():
            # Under the run's lock: a run cancelled while this call was under way records
            # nothing (its step is already cancelled, and the cancel waits for this insert).
            run = (
                Run.objects.select_for_update().filter(pk=ctx.run_id).first()
                if _is_uuid(ctx.run_id)
                else None
            )
            if run is not None and run.is_final:
                raise ToolError(f"the run is {run.status}; the side effect was not recorded")
            message = OutboxMessage.objects.create(
                idempotency_key=ctx.idempotency_key,
                tool=ctx.tool,
                kind=kind,
                destination=destination,
                payload=payload,
                run=run,
                step_index=ctx.step_index,
            )
    except IntegrityError:
        # A concurrent attempt of the same call won the race; its row is the side effect.
        return OutboxMessage.objects.get(idempotency_key=ctx.idempotency_key), False
    outbox_relay_on_commit()
    return message, True


def _is_uuid(value: str) -> bool:
    try:
        UUID(str(value))
    except ValueError:
        return False
    return True
