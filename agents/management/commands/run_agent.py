"""Submit a run from the command line and, with --wait, follow it to the end."""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agents.exceptions import AgentsError
from agents.models import Agent, Run, Step
from agents.selectors import run_waits_unserved
from agents.services import submit_run
from agentsite import jsonparse

# Seconds a run may wait on its queue before --wait says that no live worker consumes it.
NO_WORKER_NOTICE_AFTER = 3.0


def _clip(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_step(step: Step) -> str:
    if step.kind == Step.Kind.TOOL:
        what = f"tool {step.tool_name}({_clip(step.request.get('arguments', {}), 80)})"
        detail = step.error if step.error else _clip(step.response)
    else:
        data = step.response or {}
        what = f"model {step.model_route}"
        if data.get("tool_calls"):
            detail = "calls " + ", ".join(c["name"] for c in data["tool_calls"])
        else:
            detail = step.error or _clip(data.get("text") or "")
    tokens = f" {step.input_tokens}+{step.output_tokens} tokens" if step.kind == "model" else ""
    latency = f" {step.latency_ms} ms" if step.latency_ms is not None else ""
    attempts = f" (attempt {step.attempts})" if step.attempts > 1 else ""
    return f"  step {step.index} {what} -> {step.status}{attempts}{latency}{tokens}: {detail}"


class Command(BaseCommand):
    help = "Submit a run of an agent; with --wait, print each step and the result."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("agent", help="the agent's slug")
        parser.add_argument("input", help="the run's input (text, or JSON with --json)")
        parser.add_argument("--wait", action="store_true", help="follow the run to its end")
        parser.add_argument(
            "--model", metavar="PROVIDER:MODEL", help="override the agent's model route"
        )
        parser.add_argument("--json", action="store_true", help="parse the input as JSON")
        parser.add_argument(
            "--timeout", type=float, default=300.0, help="seconds to wait (default 300)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        value: Any = options["input"]
        if options["json"]:
            try:
                value = jsonparse.loads(value)
            except jsonparse.JsonInputError as exc:
                raise CommandError(f"--json given but the input is refused: {exc}") from None
            except ValueError as exc:
                raise CommandError(f"--json given but the input is not JSON: {exc}") from None
        if not Agent.objects.filter(slug=options["agent"]).exists():
            known = ", ".join(Agent.objects.values_list("slug", flat=True)) or "none; run seed_demo"
            raise CommandError(f"no agent with slug {options['agent']!r} (known: {known})")
        try:
            run = submit_run(agent=options["agent"], input=value, model_route=options["model"])
        except AgentsError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"run {run.pk} queued ({run.agent.slug} v{run.agent_version.number}, {run.model_route})"
        )
        if not options["wait"]:
            return
        self._follow(run, options["timeout"])

    def _describe_escalations(self, run: Run) -> None:
        from approvals.models import Approval

        for approval in Approval.objects.filter(run=run, status=Approval.Status.PENDING):
            what = (
                f"{approval.tool_name}({json.dumps(approval.proposed_arguments, sort_keys=True)})"
                if approval.is_about_a_tool_call
                else f"answer {_clip(approval.proposed_output, 200)}"
            )
            self.stdout.write(
                f"  waiting for a reviewer: {approval.reason}: {approval.detail}\n"
                f"    proposed: {what}\n"
                f"    decide at /admin/approvals/approval/{approval.pk}/change/ or "
                f"POST /api/v1/approvals/{approval.pk}/decision/"
            )

    def _follow(self, run: Run, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        printed: set[int] = set()
        status = run.status
        # Said once, within a few seconds: the run waits on a queue no live worker consumes.
        check_workers_at = time.monotonic() + NO_WORKER_NOTICE_AFTER
        while True:
            run.refresh_from_db()
            if check_workers_at and time.monotonic() >= check_workers_at:
                check_workers_at = time.monotonic() + NO_WORKER_NOTICE_AFTER
                stuck = run_waits_unserved(run, after=NO_WORKER_NOTICE_AFTER)
                if stuck:
                    check_workers_at = 0.0
                    self.stderr.write(f"{stuck} Still waiting.")
            if run.status != status and not run.is_final:
                status = run.status
                self.stdout.write(f"run {status}")
                if status == Run.Status.WAITING_APPROVAL:
                    self._describe_escalations(run)
            for step in run.steps.order_by("index"):
                if step.index not in printed and step.status in Step.DONE_STATUSES:
                    printed.add(step.index)
                    self.stdout.write(describe_step(step))
            if run.is_final:
                self.stdout.write(f"run {run.status}")
            if run.is_final:
                break
            if time.monotonic() > deadline:
                raise CommandError(
                    f"run {run.pk} still {run.status} after {timeout:g}s; is a worker running?"
                )
            time.sleep(0.2)
        self.stdout.write(f"tokens: {run.input_tokens} in, {run.output_tokens} out")
        if run.status != Run.Status.SUCCEEDED:
            raise CommandError(f"run {run.pk} {run.status}: [{run.error_code}] {run.error}")
        self.stdout.write(self.style.SUCCESS(f"result: {_clip(run.result, 2000)}"))
