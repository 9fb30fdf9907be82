"""The database itself refuses to change or delete audit events and their seals."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection

from audittrail import chain
from audittrail.models import AuditEvent, AuditSeal
from tests.support.audittrail import add_events

pytestmark = pytest.mark.django_db(transaction=True)

REFUSED = "audit events are append-only"


def test_updates_and_deletes_of_events_are_refused_through_the_orm_and_raw_sql():
    [event_id] = add_events(1)
    events = AuditEvent.objects.filter(pk=event_id)

    with pytest.raises(DatabaseError, match=f"{REFUSED}: UPDATE on agents_auditevent"):
        events.update(action="run.tampered")
    with pytest.raises(DatabaseError, match=f"{REFUSED}: DELETE on agents_auditevent"):
        events.delete()
    with connection.cursor() as cursor:
        with pytest.raises(DatabaseError, match=REFUSED):
            cursor.execute(
                "UPDATE agents_auditevent SET payload = '{}'::jsonb WHERE id = %s", [event_id]
            )
        with pytest.raises(DatabaseError, match=REFUSED):
            cursor.execute("DELETE FROM agents_auditevent WHERE id = %s", [event_id])

    event = AuditEvent.objects.get(pk=event_id)
    assert (event.action, event.payload) == ("test.event", {"n": 0})


def test_updates_and_deletes_of_seals_are_refused_through_the_orm_and_raw_sql():
    add_events(2)
    assert chain.seal() == 2
    seals = AuditSeal.objects.filter(seq=1)
    original = seals.get().hash

    with pytest.raises(DatabaseError, match=f"{REFUSED}: UPDATE on audittrail_auditseal"):
        seals.update(hash="0" * 64)
    with pytest.raises(DatabaseError, match=f"{REFUSED}: DELETE on audittrail_auditseal"):
        seals.delete()
    with connection.cursor() as cursor:
        with pytest.raises(DatabaseError, match=REFUSED):
            cursor.execute("UPDATE audittrail_auditseal SET hash = '' WHERE seq = 1")
        with pytest.raises(DatabaseError, match=REFUSED):
            cursor.execute("DELETE FROM audittrail_auditseal")

    assert AuditSeal.objects.count() == 2 and seals.get().hash == original


def test_inserting_events_stays_allowed():
    # The trigger guards changes only: the application appends as before, one by one or batched.
    assert len(add_events(3)) == 3
