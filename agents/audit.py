"""Writing the audit trail. Call inside the transaction of the change being recorded."""

from __future__ import annotations

from typing import Any

from .models import AuditEvent, Run


def record(
    action: str,
    *,
    run: Run | None = None,
    step_index: int | None = None,
    actor_type: str = AuditEvent.ActorType.SYSTEM,
    actor: str = "engine",
    payload: dict[str, Any] | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        action=action,
        run=run,
        step_index=step_index,
        actor_type=actor_type,
        actor=actor,
        trace_id=run.trace_id if run is not None else "",
        payload=payload or {},
    )
