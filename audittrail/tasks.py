"""Celery entry point for sealing the audit trail (run by beat)."""

from __future__ import annotations

from celery import shared_task

from . import chain

# A pass starts no new batch after this long, well inside the task's time limits; a backlog
# (the first pass over an existing trail) is worked off over several passes.
SEAL_BUDGET_SECONDS = 30.0


@shared_task(
    name="audittrail.seal_audit",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=60,
    time_limit=90,
)
def seal_audit() -> int:
    """Periodic (beat): seal the audit events that can no longer change; how many.

    Safe to run anywhere, any number of times: a pass that finds another sealer at work
    returns at once instead of queueing behind it. A no-op off Postgres.
    """
    return chain.seal_pending(budget_seconds=SEAL_BUDGET_SECONDS, wait=False)
