"""The hash chain over the audit trail (``agents.AuditEvent``) and the sealer's memory."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class AuditSeal(models.Model):
    """One link of the chain: seal ``seq`` vouches for event ``event_id``.

    ``hash`` is HMAC-SHA256(AGENTSITE_AUDIT_KEY, prev_hash + the event's canonical text), and
    ``prev_hash`` is the hash of seal ``seq - 1`` (64 zeros for seal 1), so changing, removing
    or slipping in an event, or a seal, breaks the chain from there on (``verify_audit``).
    Append-only like the events: a trigger refuses UPDATE and DELETE (migration 0001).
    """

    seq = models.BigIntegerField(primary_key=True)
    # No foreign key: a seal must outlive a deleted event, to say which one is missing.
    event_id = models.BigIntegerField(unique=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)
    sealed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["seq"]

    def __str__(self) -> str:
        return f"seal {self.seq} (event {self.event_id})"


class SealHorizon(models.Model):
    """What the sealer knows between passes (a single row, written only under its lock).

    ``settled_id``: every event id up to it is final, present or never to be (see
    ``audittrail.chain``). ``candidate_id`` and ``candidate_transactions``: the id sequence's
    value read at an earlier pass and the transactions then able to insert events; once none
    of them is left, ids up to ``candidate_id`` are settled too.
    """

    settled_id = models.BigIntegerField(default=0)
    candidate_id = models.BigIntegerField(null=True)
    candidate_transactions = models.JSONField(default=list)

    def __str__(self) -> str:
        return f"events settled up to id {self.settled_id}"
