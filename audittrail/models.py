"""The audit trail (``AuditEvent``), the hash chain over it and the sealer's memory."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone


class AuditEvent(models.Model):
    """Append-only record of every state transition and decision."""

    class ActorType(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        AGENT = "agent"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor_type = models.CharField(max_length=10, choices=ActorType.choices)
    actor = models.CharField(max_length=200, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    run = models.ForeignKey(
        "agents.Run",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        related_name="audit_events",
        db_constraint=False,
    )
    step_index = models.PositiveIntegerField(null=True, blank=True)
    trace_id = models.CharField(max_length=32, blank=True)
    payload = models.JSONField(default=dict, blank=True)

    class Meta:
        # The table it had in the agents app: moved in the state alone (migrations
        # audittrail 0002, agents 0009), so the chain's seals and triggers still cover it.
        db_table = "agents_auditevent"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.action}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValidationError("Audit events are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise ValidationError("Audit events are append-only.")


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
