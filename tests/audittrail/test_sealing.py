"""Sealing: in id order, never past an id a transaction still running could commit, never
waiting for one; each link is the documented HMAC over the previous hash and the event."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.db import connection, connections

from agents.services import submit_run
from agentsite.celery import app
from audittrail import chain
from audittrail.models import AuditEvent, AuditSeal
from audittrail.tasks import seal_audit
from tests.support.audittrail import add_events, verify

pytestmark = pytest.mark.django_db(transaction=True)


def sealed_ids() -> list[int]:
    return list(AuditSeal.objects.order_by("seq").values_list("event_id", flat=True))


def all_ids() -> list[int]:
    return list(AuditEvent.objects.order_by("id").values_list("id", flat=True))


def test_events_are_sealed_in_id_order_in_batches_into_a_gapless_chain():
    add_events(5)
    assert [chain.seal(batch=2) for _ in range(4)] == [2, 2, 1, 0]
    seals = list(AuditSeal.objects.order_by("seq"))
    assert [s.seq for s in seals] == [1, 2, 3, 4, 5]
    assert [s.event_id for s in seals] == all_ids()
    assert seals[0].prev_hash == "0" * 64
    assert all(b.prev_hash == a.hash for a, b in zip(seals, seals[1:], strict=False))


def test_a_link_is_hmac_sha256_over_the_previous_hash_and_the_events_text(make_agent, monkeypatch):
    # The format is the contract with verifiers outside Django: pin it, computed independently.
    # No worker may take the run and hold the table's insert lock while it is sealed.
    monkeypatch.setattr("agents.services.advance_run_on_commit", lambda *args, **kwargs: None)
    run = submit_run(agent=make_agent(), input="hello")
    event = AuditEvent.objects.filter(run=run).order_by("id").first()
    assert chain.seal() >= 1
    seal = AuditSeal.objects.get(event_id=event.pk)
    previous = AuditSeal.objects.filter(seq=seal.seq - 1).first()

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    with connection.cursor() as cursor:
        cursor.execute("SELECT payload::text FROM agents_auditevent WHERE id = %s", [event.pk])
        [payload_text] = cursor.fetchone()
    assert json.loads(payload_text) == event.payload
    values = [
        str(event.pk),
        str((event.created_at - epoch) // timedelta(microseconds=1)),
        event.actor_type,
        event.actor,
        event.action,
        str(run.pk),
        "" if event.step_index is None else str(event.step_index),
        run.trace_id,
        payload_text,
    ]
    message = seal.prev_hash + json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    expected = hmac.new(
        settings.AGENTSITE_AUDIT_KEY.encode(), message.encode(), hashlib.sha256
    ).hexdigest()
    assert seal.hash == expected
    assert seal.prev_hash == (previous.hash if previous else "0" * 64)


def test_an_event_still_being_written_holds_back_the_later_ones_without_being_waited_for(
    open_writer,
):
    [first] = add_events(1)
    assert chain.seal() == 1
    writer = open_writer()  # holds the next id, uncommitted
    later = add_events(2)  # committed, with higher ids

    # Sealing 'later' now would make the writer's event look slipped in once it commits.
    assert chain.seal() == 0
    assert chain.seal() == 0  # and again: the writer is still there (and is not waited for)
    assert sealed_ids() == [first]

    writer.finish()
    assert chain.seal() == 3
    assert sealed_ids() == all_ids() and len(all_ids()) == 4
    assert later[0] > sealed_ids()[1]
    status, out, err = verify("--no-seal")
    assert status == 0, err


def test_sealing_moves_on_while_new_writers_keep_coming(open_writer):
    # Under load some transaction is always writing: the ids below the ones that were writing
    # at an earlier pass are settled once those have ended, whoever writes now.
    first = open_writer()
    committed = add_events(1)
    assert chain.seal() == 0

    first.finish()
    second = open_writer()
    assert chain.seal() == 2  # the first writer's event and the committed one
    assert sealed_ids() == all_ids()[:2] and committed[0] in sealed_ids()

    second.finish()
    assert chain.seal() == 1
    assert sealed_ids() == all_ids()


def test_a_rolled_back_event_leaves_a_gap_that_is_sealed_past(open_writer):
    add_events(1)
    assert chain.seal() == 1
    writer = open_writer()
    add_events(1)
    assert chain.seal() == 0

    writer.finish(commit=False)
    assert chain.seal() == 1
    assert sealed_ids() == all_ids() and len(all_ids()) == 2
    status, _, err = verify()
    assert status == 0, err


def test_the_periodic_task_seals_and_is_routed_and_scheduled():
    add_events(3)
    assert seal_audit() == 3
    assert seal_audit() == 0
    assert "audittrail.seal_audit" in app.tasks
    assert settings.CELERY_TASK_ROUTES["audittrail.seal_audit"] == {"queue": "maintenance"}
    [entry] = [
        e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == "audittrail.seal_audit"
    ]
    assert entry["schedule"] == float(settings.AGENTSITE_AUDIT_SEAL_INTERVAL)


def test_a_sealer_that_finds_another_at_work_returns_at_once():
    add_events(2)
    other = connections.create_connection("default")  # stands in for a sealer at work
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [chain.SEALER_LOCK])
            try:
                assert chain.seal(wait=False) == 0
            finally:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [chain.SEALER_LOCK])
    finally:
        other.close()
    assert chain.seal(wait=False) == 2
