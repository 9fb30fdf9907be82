"""Check the audit trail against its hash chain; exit 1 naming every problem (on stderr)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection

from audittrail import chain
from audittrail.verification import Verification

HEAD = re.compile(r"^(\d+):([0-9a-f]{64})$")


def parse_head(text: str) -> tuple[int, str]:
    match = HEAD.match(text.strip().lower())
    if not match or int(match.group(1)) < 1:
        raise CommandError(
            f"--expect-head {text!r}: give SEQ:HASH, a seal number and its 64 hex digits, as "
            "printed by an earlier verify_audit ('head seq N hash H' is N:H)"
        )
    return int(match.group(1)), match.group(2)


class Command(BaseCommand):
    help = (
        "Seal the audit trail, then check every event against the hash chain. Prints a summary "
        "and exits 0 when intact; lists each problem on stderr and exits 1 otherwise."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--no-seal", action="store_true", help="check what is sealed already; seal nothing"
        )
        parser.add_argument(
            "--expect-head",
            metavar="SEQ:HASH",
            help="a head recorded elsewhere earlier: the chain must still hold that seal with "
            "that hash (catches a cut-off tail or a rewritten chain)",
        )
        parser.add_argument("--json", action="store_true", help="a machine-readable report")

    def handle(self, *args: Any, **options: Any) -> None:
        if not chain.supported():
            raise CommandError(
                f"the audit chain is kept on PostgreSQL only; this database is {connection.vendor}"
            )
        expect = parse_head(options["expect_head"]) if options["expect_head"] else None
        check = Verification(expect_head=expect)
        problems: list[str] = []
        first = ""
        try:
            sealed_now = 0 if options["no_seal"] else chain.seal_pending()
            for problem in check.problems():
                first = first or problem
                if options["json"]:
                    problems.append(problem)
                else:
                    self.stderr.write(problem)
        except (DatabaseError, ImproperlyConfigured) as exc:
            raise CommandError(f"cannot verify the audit trail: {exc}".strip()) from None
        if options["json"]:
            report = {
                "intact": not check.problem_count,
                "events": check.events,
                "sealed": check.sealed,
                "recent_unsealed": check.recent,
                "sealed_now": sealed_now,
                "head": asdict(check.head) if check.head else None,
                "problems": problems,
            }
            self.stdout.write(json.dumps(report, indent=2))
        if check.problem_count:
            raise CommandError(
                f"audit trail NOT intact: {check.problem_count} problem"
                f"{'s' if check.problem_count != 1 else ''}, the first: {first}"
            )
        if not options["json"]:
            self.stdout.write(summary(check))


def summary(check: Verification) -> str:
    head = f"head seq {check.head.seq} hash {check.head.hash}" if check.head else "no seals yet"
    text = f"audit trail intact: {check.events} events, {check.sealed} sealed, {head}"
    if check.expect_head:
        text += f" (the expected head, seal {check.expect_head[0]}, is in place)"
    if check.recent:
        text += f"; {check.recent} recent events not yet sealed"
    return text
