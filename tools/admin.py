"""The tool catalogue (mirrored from code; operators switch tools on and off and reset their
circuit breakers), the outbox of side effects, and the knowledge base."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from agentsite import breaker
from audittrail import writer as audit
from audittrail.actions import AuditAction

from .models import KnowledgeDocument, OutboxMessage, Tool

TOOL_FIELDS: Any = [
    "name",
    "description",
    "enabled",
    "available",
    "risk",
    "version",
    "side_effects",
    "default_mode",
    "timeout_seconds",
    "retries",
    "circuit",
    "parameters_schema",
    "digest",
    "synced_at",
    "created_at",
]


@admin.register(Tool)
class ToolAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "risk",
        "version",
        "enabled",
        "available",
        "side_effects",
        "default_mode",
        "circuit",
        "grant_count",
        "synced_at",
    ]
    list_filter = ["enabled", "available", "risk", "side_effects"]
    search_fields = ["name", "description"]
    fields = TOOL_FIELDS
    readonly_fields = [f for f in TOOL_FIELDS if f != "enabled"]
    actions = ["enable_tools", "disable_tools", "reset_circuits"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tool]:
        return super().get_queryset(request).annotate(grant_total=Count("grants"))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tools come from code: `manage.py sync_tools`

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # kept for history; a tool whose code is gone is marked unavailable

    @admin.display(description="Agents granted", ordering="grant_total")
    def grant_count(self, obj: Tool) -> int:
        return getattr(obj, "grant_total", 0)

    @admin.display(description="Circuit")
    def circuit(self, obj: Tool) -> str:
        state = breaker.status(obj.name)  # read-only: never takes a half-open probe
        if state.state == "open":
            return f"open ({state.failures} failures; probe in {round(state.retry_in)} s)"
        if state.state == "half_open":
            return "half-open (next call is a probe)"
        return f"closed ({state.failures} recent failures)" if state.failures else "closed"

    def save_model(self, request: HttpRequest, obj: Tool, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if "enabled" in form.changed_data:
            _audit_switch(request, [obj.name], obj.enabled)

    @admin.action(description="Enable the selected tools", permissions=["change"])
    def enable_tools(self, request: HttpRequest, queryset: QuerySet[Tool]) -> None:
        names = list(queryset.filter(enabled=False).values_list("name", flat=True))
        queryset.update(enabled=True)
        _audit_switch(request, names, True)
        self.message_user(request, f"Enabled {len(names)} tools.")

    @admin.action(
        description="Disable the selected tools (refuse every call)", permissions=["change"]
    )
    def disable_tools(self, request: HttpRequest, queryset: QuerySet[Tool]) -> None:
        names = list(queryset.filter(enabled=True).values_list("name", flat=True))
        queryset.update(enabled=False)
        _audit_switch(request, names, False)
        self.message_user(request, f"Disabled {len(names)} tools.")

    @admin.action(
        description="Reset the circuit breaker of the selected tools", permissions=["change"]
    )
    def reset_circuits(self, request: HttpRequest, queryset: QuerySet[Tool]) -> None:
        names = list(queryset.values_list("name", flat=True))
        for name in names:
            breaker.reset(name)
            audit.record(
                AuditAction.TOOL_CIRCUIT_RESET,
                by=audit.Actor.user(request.user),  # type: ignore[arg-type]
                payload={"tool": name},
            )
        self.message_user(request, f"Reset the circuit of {len(names)} tools.")


def _audit_switch(request: HttpRequest, names: list[str], enabled: bool) -> None:
    for name in names:
        audit.record(
            AuditAction.TOOL_ENABLED if enabled else AuditAction.TOOL_DISABLED,
            by=audit.Actor.user(request.user),  # type: ignore[arg-type]
            payload={"tool": name},
        )


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):
    """Side effects recorded by tools, one row per call; delivered by the outbox relay."""

    list_display = ["created_at", "kind", "destination", "tool", "status", "attempts", "run"]
    list_filter = ["status", "kind", "tool"]
    search_fields = ["idempotency_key", "destination", "run__id"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(KnowledgeDocument)
class KnowledgeDocumentAdmin(admin.ModelAdmin):
    list_display = ["title", "tags", "updated_at"]
    search_fields = ["title", "body", "tags"]
