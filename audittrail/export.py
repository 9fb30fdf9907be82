"""The audit trail as JSON lines, for a SIEM: one event per line, oldest first, with its seal."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import chain
from .models import AuditEvent, AuditSeal, SealHorizon

CHUNK = 2000
FIELDS = (
    "id",
    "created_at",
    "actor_type",
    "actor",
    "action",
    "run_id",
    "step_index",
    "trace_id",
    "payload",
)


def export_events(
    write: Callable[[str], Any], *, since: datetime | None = None, after_id: int = 0
) -> tuple[int, int]:
    """Write each event with an id above ``after_id`` (created at or after ``since``) as one
    JSON line (no newline; ``write`` adds it), a page at a time; (how many, the last id).

    ``seal_seq`` and ``seal_hash`` are those of the event's seal, or null while it is not
    sealed: a consumer that keeps the last id it got resumes with ``after_id``.
    """
    events = AuditEvent.objects.order_by("id")
    if since is not None:
        events = events.filter(created_at__gte=since)
    count, last_id = 0, after_id
    while True:
        page = list(events.filter(id__gt=last_id).values(*FIELDS)[:CHUNK])
        if not page:
            return count, last_id
        seals = {
            event_id: (seq, digest)
            for seq, event_id, digest in AuditSeal.objects.filter(
                event_id__in=[row["id"] for row in page]
            ).values_list("seq", "event_id", "hash")
        }
        for row in page:
            seq, digest = seals.get(row["id"], (None, None))
            row["created_at"] = row["created_at"].isoformat()
            row["run_id"] = str(row["run_id"]) if row["run_id"] is not None else None
            row["seal_seq"], row["seal_hash"] = seq, digest
            write(json.dumps(row, separators=(",", ":")))
        count += len(page)
        last_id = page[-1]["id"]


def resume_point(last_id: int) -> int:
    """The id the next export should start after so that it misses nothing: no event at or
    below it can still appear. On Postgres events commit out of id order (``audittrail.chain``),
    so that is the sealer's horizon where it is below the last id exported (the events between
    come again, sealed by then: deduplicate by id). On SQLite writers commit in id order."""
    if not chain.supported():
        return last_id
    settled = SealHorizon.objects.filter(pk=1).values_list("settled_id", flat=True).first()
    return min(last_id, settled or 0)
