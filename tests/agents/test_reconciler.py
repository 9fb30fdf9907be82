"""The reconciler: runs with no progress are nudged again, once, by whichever reconciler gets
there first; runs held by a live worker, or locked by another reconciler, are left alone."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from agents import reconciler, services
from agents.models import Run, Step
from agents.services import submit_run
from audittrail.models import AuditEvent


def stall(run: Run, seconds: int = 3600) -> None:
    Run.objects.filter(pk=run.pk).update(updated_at=timezone.now() - timedelta(seconds=seconds))


def test_a_stalled_run_is_nudged_once_and_audited(make_agent, django_capture_on_commit_callbacks):
    run = submit_run(agent=make_agent(), input="hello")
    stall(run)

    with django_capture_on_commit_callbacks() as published:
        assert reconciler.reconcile_stalled_runs() == 1
    assert len(published) == 1  # one advance_run nudge
    event = AuditEvent.objects.get(run=run, action="run.nudged")
    assert (event.actor_type, event.actor) == ("system", "reconciler")
    # The nudge counts as progress: the next pass leaves the run alone.
    assert reconciler.reconcile_stalled_runs() == 0


def test_a_run_whose_step_a_live_worker_holds_is_not_nudged(make_agent):
    run = submit_run(agent=make_agent(), input="hello")
    Step.objects.create(
        run=run,
        index=0,
        kind=Step.Kind.MODEL,
        status=Step.Status.RUNNING,
        attempts=1,
        lease_expires_at=timezone.now() + timedelta(seconds=60),
    )
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING)
    stall(run)
    assert reconciler.reconcile_stalled_runs() == 0

    Step.objects.filter(run=run).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert reconciler.reconcile_stalled_runs() == 1  # its worker is presumed dead


@pytest.mark.django_db(transaction=True)
def test_a_run_locked_by_another_reconciler_is_skipped(make_agent, monkeypatch):
    # Committed, its advance_run would be taken by a session worker of this xdist process (one
    # may be running): nothing is published, the run stays stalled until the reconciler's nudge.
    monkeypatch.setattr(services, "advance_run_on_commit", lambda run_id: None)
    run = submit_run(agent=make_agent(), input="hello")
    stall(run)
    locked, release = threading.Event(), threading.Event()

    def other_reconciler() -> None:
        try:
            with transaction.atomic():
                Run.objects.select_for_update().get(pk=run.pk)
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=other_reconciler)
    thread.start()
    try:
        assert locked.wait(10)
        assert reconciler.reconcile_stalled_runs() == 0  # not waited for: skipped
    finally:
        release.set()
        thread.join()
    assert reconciler.reconcile_stalled_runs() == 1
    assert AuditEvent.objects.filter(run=run, action="run.nudged").count() == 1
