"""Mirroring the code registry into the Tool table (the catalogue operators see in the admin)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from .models import Tool
from .registry import registry

logger = logging.getLogger(__name__)


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def sync_tools(*, using: str = "default") -> SyncReport:
    """Create or update a Tool row per registered tool; mark rows whose code is gone unavailable.

    A changed definition (description, schema, risk, limits) bumps the tool's version. Rows are
    never deleted, and the operators' ``enabled`` switch is left as they set it. Idempotent.
    """
    report = SyncReport()
    now = timezone.now()
    with transaction.atomic(using=using):
        existing = {t.name: t for t in Tool.objects.using(using).select_for_update()}
        for name in registry.names():
            spec = registry.get(name)
            assert spec is not None
            fields = {
                "description": spec.description,
                "parameters_schema": spec.parameters_schema(),
                "risk": spec.risk,
                "timeout_seconds": spec.timeout,
                "retries": spec.retries,
                "side_effects": spec.side_effects,
                "default_mode": spec.default_mode,
                "digest": spec.digest(),
                "available": True,
                "synced_at": now,
            }
            row = existing.get(name)
            if row is None:
                Tool.objects.using(using).create(name=name, **fields)
                report.created.append(name)
                continue
            changed = row.digest != spec.digest()
            if changed or not row.available or row.default_mode != spec.default_mode:
                if changed and row.digest:
                    fields["version"] = row.version + 1
                Tool.objects.using(using).filter(pk=row.pk).update(**fields)
                report.updated.append(name)
            else:
                Tool.objects.using(using).filter(pk=row.pk).update(synced_at=now)
                report.unchanged.append(name)
        for name, row in existing.items():
            if name not in registry and row.available:
                Tool.objects.using(using).filter(pk=row.pk).update(available=False, synced_at=now)
                report.unavailable.append(name)
    if report.created or report.updated or report.unavailable:
        logger.info(
            "tool catalogue synced: created %s, updated %s, unavailable %s",
            report.created,
            report.updated,
            report.unavailable,
        )
    return report
