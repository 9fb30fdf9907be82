"""What must hold after the faults, checked in Postgres, the mail sink and the audit trail.

* Every accepted run (202) is final; no run exists that the client did not get an id for.
* None failed that should not have: only a ``nonsense`` run may fail, and only with
  ``provider_invalid_response``; a run is ``cancelled`` only if the client's cancel got 202.
* Side effects: each e-mail a run's tool call queued is in the outbox exactly once and was
  delivered; a call a reviewer rejected left none. A delivery repeated after a worker died
  between the send and its commit carries the same ``Message-ID`` (counted, not a violation:
  the relay is at-least-once and says so).
* Nothing ran after its run was cancelled: no step started, no outbox row written, no step
  recorded as succeeded after the run's cancellation.
* The audit trail: every run has its ``run.submitted`` and exactly one final event, the one
  its status says; if ``manage.py verify_audit`` exists, it passes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .scenario import FINAL, PROVIDER_TIMEOUT

if TYPE_CHECKING:
    from .suite import Suite

FINAL_ACTIONS = ("run.succeeded", "run.failed", "run.cancelled")
MESSAGE_ID = re.compile(r"^Message-ID:\s*(<[^>]+>)", re.MULTILINE | re.IGNORECASE)  # maybe folded


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def violate(self, kind: str, detail: str) -> None:
        self.violations.append(f"{kind}: {detail}")

    @property
    def passed(self) -> bool:
        return not self.violations


def sink_message_ids(suite: Suite) -> Counter[str]:
    """Message-IDs of every e-mail the relay sent (Django's file backend, one file per
    connection, messages appended)."""
    seen: Counter[str] = Counter()
    for path in (suite.scratch / "mail").glob("*"):
        seen.update(MESSAGE_ID.findall(path.read_text(errors="replace")))
    return seen


def check(suite: Suite) -> Report:
    from agents.models import Run, Step
    from approvals.models import Approval
    from audittrail.models import AuditEvent
    from tools.models import OutboxMessage
    from tools.relay import message_id

    report = Report()
    ledger = suite.ledger
    accepted = ledger.submitted
    runs = {str(r.pk): r for r in Run.objects.filter(pk__in=list(accepted))}
    statuses = Counter(r.status for r in runs.values())

    # 1. Every accepted run is final, and the client's retries made no run twice.
    lost = [rid for rid in accepted if rid not in runs or not runs[rid].is_final]
    for rid in lost[:10]:
        run = runs.get(rid)
        report.violate("lost", f"run {rid} is {run.status if run else 'missing'}")
    extra = Run.objects.exclude(pk__in=list(accepted)).count()
    if extra:
        report.violate("duplicate runs", f"{extra} runs the client never got an id for")
    for line in ledger.refused:
        report.violate("refused submission", line)

    # 2. None failed, or was cancelled, that should not have been.
    wrongly_failed = 0
    expected_failures = 0
    provider_failures = 0
    for rid, entry in accepted.items():
        run = runs.get(rid)
        if run is None or not run.is_final:
            continue
        if run.status == Run.Status.FAILED:
            if entry.kind == "nonsense" and run.error_code == "provider_invalid_response":
                expected_failures += 1
            elif injected_on_every_attempt(run):
                provider_failures += 1
            else:
                wrongly_failed += 1
                report.violate(
                    "wrongly failed",
                    f"run {rid} ({entry.kind}): {run.error_code}: {run.error}\n    "
                    + story(run, suite.first_submit_wall),
                )
        elif run.status == Run.Status.CANCELLED and not (
            entry.cancel_status == 202 or (entry.cancel_status == 409 and entry.cancel_retried)
        ):
            # (A 409 after a retry answers our own first try, whose answer was lost.)
            report.violate("wrongly cancelled", f"run {rid} ({entry.kind})")
        elif entry.cancel_status == 202 and run.status != Run.Status.CANCELLED:
            report.violate(
                "cancel lost", f"run {rid}: the API accepted the cancel; it {run.status}"
            )
        elif run.status == Run.Status.SUCCEEDED and run.result != FINAL.format(
            input=f"chaos run {entry.index}"
        ):
            report.violate("wrong result", f"run {rid}: {run.result!r}")

    # 3. Side effects: once in the outbox, delivered; none for a rejected call.
    rows = list(OutboxMessage.objects.filter(run_id__in=list(accepted)))
    # (One row per tool call is the outbox's unique key; what can go wrong is a call made
    # twice, or a row missing, which the per-run counts below catch.)
    by_step = {(str(r.run_id), r.step_index) for r in rows}
    email_steps = Step.objects.filter(
        run_id__in=list(accepted), tool_name="send_email", status=Step.Status.SUCCEEDED
    ).values_list("run_id", "index")
    missing = [(str(r), i) for r, i in email_steps if (str(r), i) not in by_step]
    for rid, index in missing[:10]:
        report.violate("side effect missing", f"run {rid} step {index} succeeded, no outbox row")
    undelivered = [r for r in rows if r.status != OutboxMessage.Status.DELIVERED]
    for row in undelivered[:10]:
        report.violate("not delivered", f"outbox row {row.pk} is {row.status}: {row.last_error}")
    sent = sink_message_ids(suite)
    never_sent = [
        r for r in rows if r.status == "delivered" and not sent[message_id(r.idempotency_key)]
    ]
    for row in never_sent[:10]:
        report.violate("delivery lost", f"outbox row {row.pk} is delivered but was never sent")
    sent_twice = sum(n - 1 for n in sent.values() if n > 1)
    rejected = Approval.objects.filter(run_id__in=list(accepted), status="rejected")
    for approval in rejected:
        if (str(approval.run_id), approval.step_index) in by_step:
            report.violate("rejected call ran", f"run {approval.run_id} step {approval.step_index}")
    # Per run: a run that succeeded without being cancelled sent exactly the e-mails its
    # script asks for: one for `tools`, one for an approved `approval`, none otherwise.
    rows_per_run = Counter(str(r.run_id) for r in rows)
    with ledger.lock:
        decided = dict(ledger.decided_runs)
    twice = 0
    for rid, entry in accepted.items():
        run = runs.get(rid)
        if run is None or run.status != Run.Status.SUCCEEDED:
            continue
        expected = 1 if entry.kind == "tools" or decided.get(rid) == "approve" else 0
        if rows_per_run[rid] > expected:
            twice += 1
        elif rows_per_run[rid] < expected:
            missing.append((rid, -1))
        if rows_per_run[rid] != expected:
            report.violate(
                "side effects per run",
                f"run {rid} ({entry.kind}, {decided.get(rid, 'no decision')}) succeeded with "
                f"{rows_per_run[rid]} e-mails in the outbox, expected {expected}",
            )

    # 4. Nothing after a cancel.
    after_cancel = 0
    for rid, run in runs.items():
        if run.status != Run.Status.CANCELLED or run.finished_at is None:
            continue
        late_steps = Step.objects.filter(run=run, started_at__gt=run.finished_at).count()
        late_rows = sum(1 for r in rows if str(r.run_id) == rid and r.created_at > run.finished_at)
        late_events = AuditEvent.objects.filter(
            run=run,
            created_at__gt=run.finished_at,
            action__in=("step.succeeded", "tool_call.succeeded"),
        ).count()
        if late_steps or late_rows or late_events:
            after_cancel += 1
            report.violate(
                "ran after cancel",
                f"run {rid}: {late_steps} steps started, {late_rows} side effects, "
                f"{late_events} steps succeeded after it was cancelled",
            )

    # 5. The audit trail tells each run's story once.
    audit_problems = 0
    events: dict[str, Counter[str]] = {}
    for rid, action in AuditEvent.objects.filter(run_id__in=list(runs)).values_list(
        "run_id", "action"
    ):
        events.setdefault(str(rid), Counter())[action] += 1
    for rid, run in runs.items():
        seen = events.get(rid, Counter())
        finals = {a: seen[a] for a in FINAL_ACTIONS if seen[a]}
        problem = ""
        if seen["run.submitted"] != 1:
            problem = f"{seen['run.submitted']} run.submitted events"
        elif run.is_final and finals != {f"run.{run.status}": 1}:
            problem = f"final events {finals} for a run that is {run.status}"
        if problem:
            audit_problems += 1
            if audit_problems <= 10:
                report.violate("audit", f"run {rid}: {problem}")
    verify = verify_audit_chain(suite)
    if verify.startswith("FAILED"):
        report.violate("audit chain", verify)

    nudges = AuditEvent.objects.filter(run_id__in=list(runs), action="run.nudged").count()
    takeovers = AuditEvent.objects.filter(
        run_id__in=list(runs), action__in=("step.lease_expired", "tool_call.attempt")
    ).count()
    retries = AuditEvent.objects.filter(
        run_id__in=list(runs), action="step.retry_scheduled"
    ).count()
    report.figures = {
        "runs_accepted": len(accepted),
        "statuses": dict(statuses),
        "expected_failures": expected_failures,
        "failed_on_injected_faults": provider_failures,
        "wrongly_failed": wrongly_failed,
        "lost": len(lost),
        "cancelled_by_client": sum(1 for e in accepted.values() if e.cancel_status == 202),
        "approvals_decided": dict(Counter(decided.values())),
        "outbox_rows": len(rows),
        "outbox_delivered": len(rows) - len(undelivered),
        "side_effects_twice": twice,
        "side_effects_missing": len({rid for rid, _ in missing}),  # runs
        "sent_twice_same_message_id": sent_twice,
        "ran_after_cancel": after_cancel,
        "audit_problems": audit_problems,
        "audit_chain": verify,
        "reconciler_nudges": nudges,
        "step_retries": retries,
        "lease_takeovers": takeovers,
        "client_retries": ledger.client_retries,
        "faults": [f"{at:.1f}s {fault.describe()}" for at, fault in ledger.faults],
        "quiesced_after_s": suite.quiesced_after,
    }
    return report


# What the provider's errors say when the suite injected them (500, 429, a slow answer).
INJECTED = ("injected by the fake server", f"timed out after {PROVIDER_TIMEOUT}s")


def injected_on_every_attempt(run: Any) -> bool:
    """A run that gave up on a model step every attempt of which met an injected fault: the
    model answered an injected error (500, 429, too slow), or the attempt was lost with its
    worker (killed) and taken over after its lease. The retry policy did its job (4 attempts);
    the faults outlasted it (a step's attempts can fall into several fault windows when lost
    messages delay them). Any other failure is unexplained."""
    from django.conf import settings

    from audittrail.models import AuditEvent

    if run.error_code not in ("provider_unavailable", "worker_lost"):
        return False
    events = list(AuditEvent.objects.filter(run=run).order_by("id"))
    failing = [e for e in events if e.action in ("step.failed", "step.lease_expired")]
    index = failing[-1].step_index if failing else None
    if run.error_code == "worker_lost":
        # The final attempt was lost; model_step.plan fails the step with no step.failed event.
        index = max((e.step_index for e in events if e.step_index is not None), default=None)
    if index is None:
        return False
    step_events = [e for e in events if e.step_index == index]
    errors = [
        str(e.payload.get("error", ""))
        for e in step_events
        if e.action in ("step.retry_scheduled", "step.failed")
    ]
    lost = sum(1 for e in step_events if e.action == "step.lease_expired")
    lost += 1 if run.error_code == "worker_lost" else 0
    explained = all(any(mark in error for mark in INJECTED) for error in errors)
    # Each kind of model fault is injected once, for less time than a step's retries span:
    # attempts that all failed on one kind mean the backoff did not do its job.
    kinds = {m for error in errors for m in ("HTTP 500", "HTTP 429", "timed out") if m in error}
    return (
        explained
        and len(kinds) + (1 if lost else 0) >= 2
        and len(errors) + lost >= settings.AGENTSITE_STEP_MAX_ATTEMPTS
    )


def story(run: Any, origin: float) -> str:
    """The run's audit events, compactly: seconds since the first submission, action, step."""
    from audittrail.models import AuditEvent

    parts = []
    for event in AuditEvent.objects.filter(run=run).order_by("id")[:40]:
        step = f"#{event.step_index}" if event.step_index is not None else ""
        detail = event.payload.get("error") or event.payload.get("attempts") or ""
        parts.append(
            f"{event.created_at.timestamp() - origin:.1f}s {event.action}{step}"
            + (f" ({str(detail)[:60]})" if detail else "")
        )
    return "; ".join(parts)


def verify_audit_chain(suite: Suite) -> str:
    """``manage.py verify_audit`` if this version has it (the tamper-evident chain)."""
    from django.core.management import get_commands

    from .suite import ROOT

    if "verify_audit" not in get_commands():
        return "not checked: this version has no verify_audit command"
    done = subprocess.run(
        [sys.executable, "manage.py", "verify_audit"],
        cwd=str(ROOT),
        env=suite.env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = (done.stdout + done.stderr).strip().splitlines()
    last = output[-1] if output else ""
    return f"verified: {last}" if done.returncode == 0 else f"FAILED ({done.returncode}): {last}"
