"""Recording a tool's side effect in the outbox, at most once per call.

A side-effecting tool does not act on the world directly: it writes what should happen to the
``OutboxMessage`` table under the call's idempotency key (run, step, call id), and a relay
delivers it. However often the call is retried or redelivered (a worker killed mid-call, a lost
acknowledgement), the key is unique, so the side effect is recorded exactly once.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from agents.dispatch import outbox_relay_on_commit
from agents.models import Run

from .models import OutboxMessage
from .registry import ToolContext


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
    run_id = ctx.run_id if Run.objects.filter(pk=ctx.run_id).exists() else None
    try:
        with transaction.atomic():
            message = OutboxMessage.objects.create(
                idempotency_key=ctx.idempotency_key,
                tool=ctx.tool,
                kind=kind,
                destination=destination,
                payload=payload,
                run_id=run_id,
                step_index=ctx.step_index,
            )
    except IntegrityError:
        # A concurrent attempt of the same call won the race; its row is the side effect.
        return OutboxMessage.objects.get(idempotency_key=ctx.idempotency_key), False
    outbox_relay_on_commit()
    return message, True
