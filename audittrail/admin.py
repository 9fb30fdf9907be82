"""The audit trail and its seal chain in the admin, read-only (written by the writer and the
sealer alone)."""

from __future__ import annotations

from django.contrib import admin

from agents.admin import ReadOnlyAdminMixin

from .models import AuditEvent, AuditSeal


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "action", "actor_type", "actor", "run", "step_index"]
    list_filter = ["action", "actor_type"]
    search_fields = ["run__id", "trace_id", "actor", "action"]


@admin.register(AuditSeal)
class AuditSealAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["seq", "event_id", "hash", "sealed_at"]
    # Exact matches (as text: any search term is valid): which seal covers event 123?
    search_fields = ["seq__exact", "event_id__exact"]
    # The chain grows with every event: no COUNT(*) over it on each page.
    show_full_result_count = False
