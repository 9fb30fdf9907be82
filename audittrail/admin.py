"""The seal chain in the admin, read-only (it is written by the sealer alone)."""

from __future__ import annotations

from django.contrib import admin

from agents.admin import ReadOnlyAdminMixin

from .models import AuditSeal


@admin.register(AuditSeal)
class AuditSealAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["seq", "event_id", "hash", "sealed_at"]
    # Exact matches (as text: any search term is valid): which seal covers event 123?
    search_fields = ["seq__exact", "event_id__exact"]
    # The chain grows with every event: no COUNT(*) over it on each page.
    show_full_result_count = False
