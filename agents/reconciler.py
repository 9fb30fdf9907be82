"""Finding runs that should be moving but are not, and nudging them again.

A Celery message is only a nudge; if it was lost (broker restarted, worker killed before the
message was re-queued) the run's state in Postgres is intact and a new nudge resumes it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from audittrail import writer as audit
from audittrail.actions import AuditAction
from tools.registry import registry

from .dispatch import advance_run_on_commit, tool_call_on_commit
from .engine import blocked_by_session
from .models import Run, Step

logger = logging.getLogger(__name__)


def reconcile_stalled_runs(*, limit: int = 500) -> int:
    """Nudge active runs with no progress for ``AGENTSITE_STALLED_AFTER`` seconds.

    A run waiting for a reviewer is not advanced, but its calls that are not held (allowed, or
    already approved) are re-sent if their message was lost or their worker died.

    Safe to run anywhere and concurrently: each run is re-checked under its row lock (a run locked
    by another reconciler or a worker is skipped, one nudged meanwhile is fresh again), and a
    nudge is idempotent anyway. Runs whose current step is held by a live worker (unexpired
    lease) are left alone. Returns the number of runs nudged.
    """
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.AGENTSITE_STALLED_AFTER)
    stalled = list(
        Run.objects.filter(updated_at__lt=cutoff)
        .filter(
            Q(status__in=(Run.Status.QUEUED, Run.Status.RUNNING))
            # Waiting for a reviewer: only if it has calls that are not held (else the many
            # runs that just wait would crowd real stalls out of the batch).
            | Q(status=Run.Status.WAITING_APPROVAL)
            & Exists(
                Step.objects.filter(
                    run=OuterRef("pk"), status__in=(Step.Status.PENDING, Step.Status.RUNNING)
                )
            )
        )
        .order_by("updated_at")
        .values_list("pk", flat=True)[:limit]
    )
    nudged = 0
    for run_id in stalled:
        with transaction.atomic():
            # Another reconciler (beat on several hosts) or a worker holding the run skips it;
            # re-checked under the lock, a run nudged or moved meanwhile is left alone.
            run = (
                Run.objects.select_for_update(skip_locked=True, of=("self",))
                .filter(pk=run_id, updated_at__lt=cutoff, status__in=Run.ACTIVE_STATUSES)
                .first()
            )
            if run is None:
                continue
            open_steps = list(
                Step.objects.filter(
                    run_id=run_id, status__in=(Step.Status.PENDING, Step.Status.RUNNING)
                )
            )
            if any(
                (
                    s.status == Step.Status.RUNNING
                    and s.lease_expires_at is not None
                    and s.lease_expires_at > now
                )
                or (s.status == Step.Status.PENDING and s.not_before and s.not_before > now)
                for s in open_steps
            ):
                continue  # held by a live worker, or waiting out a backoff
            if run.status == Run.Status.QUEUED and blocked_by_session(run):
                continue  # its session's earlier run nudges it when that one ends
            tool_steps = [s for s in open_steps if s.kind == Step.Kind.TOOL]
            if run.status == Run.Status.WAITING_APPROVAL and not tool_steps:
                continue  # only a reviewer moves it on; calls not held are re-sent below
            for step in tool_steps:
                spec = registry.get(step.tool_name)
                tool_call_on_commit(run_id, step.index, timeout=spec.timeout if spec else 30)
            if not tool_steps and run.status != Run.Status.WAITING_APPROVAL:
                advance_run_on_commit(run_id)
            Run.objects.filter(pk=run_id).update(updated_at=now)
            audit.record(
                AuditAction.RUN_NUDGED,
                run=run,
                by=audit.Actor.system("reconciler"),
                payload={"tool_steps": [s.index for s in tool_steps]},
            )
            nudged += 1
    if nudged:
        logger.info("reconciler nudged %d stalled runs", nudged)
    return nudged
