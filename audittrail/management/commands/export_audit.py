"""Export the audit trail as JSON lines (one event per line) for a SIEM, streamed."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import dateparse, timezone

from audittrail.export import export_events, resume_point


def parse_since(text: str) -> dt.datetime:
    """An ISO 8601 date-time (UTC when it has no offset) or date (its midnight, UTC)."""
    try:
        moment = dateparse.parse_datetime(text)
        if moment is None:
            day = dateparse.parse_date(text)
            moment = dt.datetime.combine(day, dt.time()) if day else None
    except ValueError:
        moment = None
    if moment is None:
        raise CommandError(
            f"--since {text!r} is not an ISO 8601 date or date-time (e.g. 2025-06-01T12:00:00Z)"
        )
    return timezone.make_aware(moment, dt.UTC) if timezone.is_naive(moment) else moment


class Command(BaseCommand):
    help = (
        "Write the audit events as JSON lines, oldest first, each with its seal (seq and hash) "
        "once sealed. The count and where to resume (--after-id) go to stderr; a resumed export "
        "can repeat events that were not yet final (deduplicate by id)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        start = parser.add_mutually_exclusive_group()
        start.add_argument(
            "--since", metavar="ISO", help="events created at or after this (UTC if no offset)"
        )
        start.add_argument(
            "--after-id",
            type=int,
            default=0,
            metavar="N",
            help="events with an id above N (the last id of an earlier export)",
        )
        parser.add_argument("--output", metavar="FILE", help="write to FILE, not stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        since = parse_since(options["since"]) if options["since"] else None
        if options["after_id"] < 0:
            raise CommandError("--after-id must be 0 or more")
        path = options["output"]
        if path:
            try:
                with open(path, "w", encoding="utf-8") as out:
                    count, last_id = export_events(
                        lambda line: out.write(line + "\n"),
                        since=since,
                        after_id=options["after_id"],
                    )
            except OSError as exc:
                raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
        else:
            count, last_id = export_events(
                self.stdout.write, since=since, after_id=options["after_id"]
            )
        where = f" to {path}" if path else ""
        resume = ""
        if count:
            after = resume_point(last_id)
            resume = f"; the last id is {last_id}; resume with --after-id {after}"
            if after < last_id:
                resume += " (later events may still be committing: some lines will come again)"
        self.stderr.write(f"exported {count} events{where}{resume}")
