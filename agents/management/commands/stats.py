"""Print operators' figures for the last hour and day (or one --since window): runs by status,
failure and escalation rates, step latency, tokens and cost per agent (from agents.selectors)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from agents import selectors
from agents.models import Agent
from agents.selectors import DEFAULT_WINDOWS, TOP_AGENTS, WINDOWS, summarise_window
from agentsite import heartbeats

KNOWN_AGENTS_SHOWN = 20


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of an aligned text table: the first column left-aligned, the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  "
        + "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]


def _percent(share: dict[str, Any]) -> str:
    return "-" if share["rate"] is None else f"{share['rate'] * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _moment(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


class Command(BaseCommand):
    help = (
        "Runs created in the last hour and the last day (or in one --since window): by status, "
        "failed and escalated shares, step latency p50/p95 by kind, tokens and cost per agent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since",
            metavar="|".join(WINDOWS),
            help="one window instead of the last hour and the last day",
        )
        parser.add_argument("--agent", metavar="SLUG", help="only this agent's runs and steps")
        parser.add_argument(
            "--json", action="store_true", help="machine-readable output (costs are strings)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        since = options["since"]
        if since is not None and since not in WINDOWS:
            raise CommandError(
                f"--since {since!r} is not a window we summarise: use one of {', '.join(WINDOWS)}"
            )
        agent = self._agent(options["agent"])
        now = timezone.now()
        windows = [
            {"window": label, **summarise_window(WINDOWS[label], now=now, agent=agent)}
            for label in ([since] if since is not None else DEFAULT_WINDOWS)
        ]
        queues = self._queues(now)
        if options["json"]:
            report = {
                "generated_at": now.isoformat(),
                "agent": agent.slug if agent is not None else None,
                "windows": [
                    {**w, "since": w["since"].isoformat(), "until": w["until"].isoformat()}
                    for w in windows
                ],
                "queues": queues,
            }
            self.stdout.write(json.dumps(report, indent=2))
            return
        for number, window in enumerate(windows):
            if number:
                self.stdout.write("")
            self._print(window)
        self._print_queues(queues, now)

    @staticmethod
    def _queues(now: datetime) -> dict[str, Any] | None:
        """Live workers per queue (their heartbeats) and, for a queue without any, the runs
        that have waited on it past AGENTSITE_QUEUE_NO_CONSUMER_AFTER; None if unreadable."""
        try:
            consumers = heartbeats.consumers()
        except Exception:
            return None
        unserved = {q.queue: q for q in selectors.unserved_queues(now=now) or []}
        report = {}
        for queue, count in consumers.items():
            waiting = unserved.get(queue)
            oldest = waiting.oldest if waiting is not None else None
            report[queue] = {
                "consumers": count,
                "runs_waiting": waiting.runs_waiting if waiting is not None else 0,
                "oldest_waiting_since": oldest.isoformat() if oldest is not None else None,
            }
        return report

    def _print_queues(self, queues: dict[str, Any] | None, now: datetime) -> None:
        self.stdout.write("")
        self.stdout.write(self.style.MIGRATE_HEADING("Queues now (live workers, by heartbeat)"))
        if queues is None:
            self.stdout.write("  unknown: the workers' heartbeats cannot be read (is Redis up?)")
            return
        threshold = settings.AGENTSITE_QUEUE_NO_CONSUMER_AFTER
        rows = [[queue, str(row["consumers"])] for queue, row in queues.items()]
        for line in table(["queue", "workers"], rows):
            self.stdout.write(line)
        for queue, row in queues.items():
            if not row["consumers"]:
                waiting = (
                    f": {row['runs_waiting']} runs have waited on it more than {threshold:g} s"
                    if row["runs_waiting"]
                    else ""
                )
                self.stdout.write(self.style.WARNING(f"  no live worker consumes {queue}{waiting}"))

    def _agent(self, slug: str | None) -> Agent | None:
        if slug is None:
            return None
        agent = Agent.objects.filter(slug=slug).first()
        if agent is None:
            known = list(
                Agent.objects.order_by("slug").values_list("slug", flat=True)[
                    : KNOWN_AGENTS_SHOWN + 1
                ]
            )
            listed = ", ".join(known[:KNOWN_AGENTS_SHOWN]) or "none"
            more = ", …" if len(known) > KNOWN_AGENTS_SHOWN else ""
            raise CommandError(f"--agent: no agent with slug {slug!r} (known: {listed}{more})")
        return agent

    def _print(self, window: dict[str, Any]) -> None:
        who = f", agent {window['agent']}" if window["agent"] else ""
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                f"Last {window['window']}: {_moment(window['since'])} to "
                f"{_moment(window['until'])} UTC{who}"
            )
        )
        runs = window["runs"]
        lines = ["", "Runs created in the window"]
        lines += table(
            ["status", "runs"],
            [[status, str(n)] for status, n in runs["by_status"].items()]
            + [["total", str(runs["total"])]],
        )
        lines += ["", f"Shares of the {runs['total']} runs"]
        lines += table(
            ["", "runs", "share"],
            [
                [name, str(window[name]["runs"]), _percent(window[name])]
                for name in ("failed", "escalated")
            ],
        )
        lines += ["", "Step latency, steps finished in the window (ms)"]
        lines += table(
            ["kind", "steps", "p50", "p95"],
            [
                [kind, str(row["steps"]), _ms(row["p50"]), _ms(row["p95"])]
                for kind, row in window["step_latency_ms"].items()
            ],
        )
        lines += ["", f"Usage by agent, costliest first (top {TOP_AGENTS})"]
        rows = [[row["agent"], str(row["runs"]), *self._usage(row)] for row in window["agents"]]
        other = window["other_agents"]
        if other is not None:
            rows.append(
                [f"({other['agents']} other agents)", str(other["runs"]), *self._usage(other)]
            )
        if rows:
            totals = window["totals"]
            rows.append(["total", str(totals["runs"]), *self._usage(totals)])
        else:
            rows.append(["no runs", "0", "-", "-", "-"])
        lines += table(["agent", "runs", "tokens in", "tokens out", "cost"], rows)
        for line in lines:
            self.stdout.write(line)

    @staticmethod
    def _usage(row: dict[str, Any]) -> list[str]:
        return [str(row["input_tokens"]), str(row["output_tokens"]), row["cost"]]
