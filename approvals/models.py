"""Escalations to a human: an action held until a reviewer approves, edits or rejects it."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from django.conf import settings
from django.db import models


def action_digest(tool: str, arguments: Any) -> str:
    """A digest binding a decision to the exact action reviewed (tool and arguments)."""
    canonical = json.dumps({"tool": tool, "arguments": arguments}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Approval(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"
        EXPIRED = "expired"
        CANCELLED = "cancelled"  # the run ended (e.g. cancelled by its client) first

    class Reason(models.TextChoices):
        TOOL_REQUIRES_APPROVAL = "tool_requires_approval"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey("agents.Run", on_delete=models.CASCADE, related_name="approvals")
    step_index = models.PositiveIntegerField()
    reason = models.CharField(max_length=40, choices=Reason.choices)
    tool_name = models.CharField(max_length=100, blank=True)
    # What the agent proposed, and its digest; a decision is bound to this exact action.
    proposed_arguments = models.JSONField(default=dict, blank=True)
    proposed_digest = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    # What may run after approval: the proposal, or the reviewer's edit of it.
    approved_arguments = models.JSONField(null=True, blank=True)
    approved_digest = models.CharField(max_length=64, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="approval_decisions",
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    comment = models.TextField(blank=True)
    # Set when the approved action is taken, so one approval never runs two actions.
    consumed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step_index"], name="approval_unique_run_step")
        ]
        indexes = [models.Index(fields=["status", "created_at"], name="approval_status_created")]

    def __str__(self) -> str:
        return f"{self.reason} for {self.tool_name or 'run'} ({self.status})"
