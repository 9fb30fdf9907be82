"""Escalations to a human: an action held until a reviewer approves, edits or rejects it."""

from __future__ import annotations

import hashlib
import json
import uuid
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.db import models


class Decision(StrEnum):
    """What a reviewer does with an approval (an edit approves what the reviewer wrote)."""

    APPROVE = "approve"
    REJECT = "reject"
    EDIT = "edit"


def action_digest(tool: str, arguments: Any) -> str:
    """A digest binding a decision to the exact action reviewed (tool and arguments)."""
    canonical = json.dumps({"tool": tool, "arguments": arguments}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def output_digest(output: Any) -> str:
    """A digest binding a decision to the exact answer reviewed."""
    canonical = json.dumps({"output": output}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Approval(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"
        EXPIRED = "expired"
        CANCELLED = "cancelled"  # the run ended (e.g. cancelled by its client) first

    class Reason(models.TextChoices):
        TOOL_REQUIRES_APPROVAL = "tool_requires_approval", "Tool requires approval"
        LOW_CONFIDENCE = "low_confidence", "Low confidence"
        OUTPUT_INVALID = "output_invalid", "Output fails the schema"
        BUDGET_EXHAUSTED = "budget_exhausted", "Budget exhausted"
        MODEL_REQUESTED = "model_requested", "The model asked for a human"

    class Priority(models.IntegerChoices):
        LOW = 0, "low"
        NORMAL = 1, "normal"
        HIGH = 2, "high"
        URGENT = 3, "urgent"

    # Reasons whose subject is a tool call (arguments) rather than the run's answer (output).
    TOOL_REASONS = (Reason.TOOL_REQUIRES_APPROVAL, Reason.MODEL_REQUESTED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey("agents.Run", on_delete=models.CASCADE, related_name="approvals")
    # The step it is about: the held tool call, or the model turn whose answer is reviewed.
    step_index = models.PositiveIntegerField()
    reason = models.CharField(max_length=40, choices=Reason.choices)
    detail = models.TextField(blank=True, help_text="Why, in words: what triggered it.")
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.NORMAL)
    due_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # What a reviewer needs to decide: the run's input, the agent, the last steps.
    context = models.JSONField(default=dict, blank=True)
    tool_name = models.CharField(max_length=100, blank=True)
    # What the agent proposed, and its digest; a decision is bound to this exact action.
    proposed_arguments = models.JSONField(default=dict, blank=True)
    proposed_output = models.JSONField(null=True, blank=True)
    proposed_digest = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    # What may run after approval: the proposal, or the reviewer's edit of it.
    approved_arguments = models.JSONField(null=True, blank=True)
    approved_output = models.JSONField(null=True, blank=True)
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
        # The queue: most urgent first, then the soonest due, then the oldest.
        ordering = ["-priority", "due_at", "created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "step_index", "reason"], name="approval_unique_run_step_reason"
            )
        ]
        indexes = [
            models.Index(fields=["status", "created_at"], name="approval_status_created"),
            models.Index(fields=["status", "-priority", "due_at"], name="approval_queue"),
        ]
        permissions = [("decide_approval", "Can approve, edit or reject escalations")]
        verbose_name_plural = "Review queue"

    def __str__(self) -> str:
        return f"{self.get_reason_display()}: {self.tool_name or 'answer'} ({self.status})"

    @property
    def is_about_a_tool_call(self) -> bool:
        return self.reason in self.TOOL_REASONS

    @property
    def is_overdue(self) -> bool:
        from django.utils import timezone

        return (
            self.status == self.Status.PENDING
            and self.due_at is not None
            and self.due_at < timezone.now()
        )
