"""The tool catalogue, the grants that let agents call tools, the outbox, and the knowledge base."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models

from .constraints import constraint_errors
from .registry import MODES, RISKS, registry


class Tool(models.Model):
    """A tool as the catalogue knows it, mirrored from the code registry by ``sync_tools``.

    Rows are never deleted: a tool whose code is gone is marked unavailable, so grants and the
    history of runs that called it stay readable. ``enabled`` is the operators' switch.
    """

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    parameters_schema = models.JSONField(default=dict, blank=True)
    risk = models.CharField(max_length=10, choices=[(r, r) for r in RISKS], default="low")
    timeout_seconds = models.PositiveIntegerField(default=30)
    retries = models.PositiveIntegerField(default=3)
    side_effects = models.BooleanField(default=False)
    default_mode = models.CharField(max_length=20, choices=[(m, m) for m in MODES], default="allow")
    version = models.PositiveIntegerField(
        default=1, help_text="Goes up whenever the tool's definition in code changes."
    )
    digest = models.CharField(max_length=64, blank=True)
    enabled = models.BooleanField(
        default=True, help_text="Switch off to refuse every call to this tool, for every agent."
    )
    available = models.BooleanField(
        default=True, help_text="False when the tool's code is not installed on this server."
    )
    synced_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ToolGrant(models.Model):
    """Permission for one agent to call one tool. No grant, no call."""

    class Mode(models.TextChoices):
        ALLOW = "allow"
        REQUIRE_APPROVAL = "require_approval"

    agent = models.ForeignKey("agents.Agent", on_delete=models.CASCADE, related_name="grants")
    tool = models.ForeignKey(Tool, on_delete=models.PROTECT, related_name="grants")
    mode = models.CharField(max_length=20, choices=Mode.choices, default=Mode.ALLOW)
    constraints = models.JSONField(
        default=dict,
        blank=True,
        help_text=(
            'Rules on arguments, checked before the call: {"argument": {"rule": value}}. Rules: '
            "min, max, one_of, pattern, max_length, hosts (URL hosts; '*.example.com' allows "
            'subdomains), email_domains. Example: {"amount": {"max": 100}}.'
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["agent", "tool__name"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "tool"], name="toolgrant_unique_agent_tool")
        ]

    def __str__(self) -> str:
        return f"{self.agent_id}:{self.tool_id} ({self.mode})"

    def clean(self) -> None:
        if self.tool_id is None:
            return
        spec = registry.get(self.tool.name)
        schema = spec.parameters_schema() if spec else self.tool.parameters_schema
        problems = constraint_errors(self.constraints, schema)
        if problems:
            raise ValidationError({"constraints": problems})

    def snapshot(self) -> dict[str, Any]:
        return {"mode": self.mode, "constraints": self.constraints or {}}


class OutboxMessage(models.Model):
    """A side effect a tool performed, keyed by the call's idempotency key so it exists once.

    Tools write here instead of acting directly; a relay (``tools.deliver_outbox``) delivers the
    rows. A redelivered or retried call finds its row and does not add another.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"

    idempotency_key = models.CharField(max_length=400, unique=True)
    tool = models.CharField(max_length=100)
    kind = models.CharField(max_length=40, help_text="What to deliver, e.g. 'email'.")
    destination = models.CharField(max_length=500, blank=True)
    payload = models.JSONField(default=dict)
    run = models.ForeignKey(
        "agents.Run",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="outbox_messages",
    )
    step_index = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"], name="outbox_status_created")]

    def __str__(self) -> str:
        return f"{self.kind} to {self.destination} ({self.status})"


class KnowledgeDocument(models.Model):
    """A document of the knowledge base searched by the ``knowledge_search`` tool."""

    title = models.CharField(max_length=200, unique=True)
    body = models.TextField()
    tags = models.CharField(max_length=200, blank=True, help_text="Comma-separated keywords.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["title"]

    def __str__(self) -> str:
        return self.title
