"""Mirror the tools registered in code into the Tool catalogue."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from tools.catalogue import sync_tools


class Command(BaseCommand):
    help = (
        "Mirror the tools registered in code into the Tool table: new tools are added, changed "
        "ones get a new version, tools whose code is gone are marked unavailable (never deleted)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        report = sync_tools()
        for label, names in (
            ("created", report.created),
            ("updated", report.updated),
            ("marked unavailable", report.unavailable),
        ):
            for name in names:
                self.stdout.write(f"{label}: {name}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{len(report.created)} created, {len(report.updated)} updated, "
                f"{len(report.unavailable)} marked unavailable, "
                f"{len(report.unchanged)} unchanged"
            )
        )
