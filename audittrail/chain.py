"""Sealing the audit trail into a hash chain, after the fact and without a lock on the inserts.

Events are written by many transactions at once (``audittrail.writer``), each taking its id from
the table's identity sequence. Ids are handed out in order but commit in any order: while
event 101 is already visible, the transaction holding 100 may still be running, and commit
(or roll back) a second later. Sealing 101 before 100 is final would later show 100 as slipped
into the chain. So the sealer links events in id order, but only up to a *settled* id: one
below which no event can still appear.

Which ids are settled, read from Postgres without taking any lock an insert would wait for:

1. Every INSERT takes a ROW EXCLUSIVE lock on its table before it evaluates the row's default
   (``nextval`` of the identity sequence), and holds it until its transaction ends. (A
   savepoint rolled back releases it, but then its rows are rolled back too.) Postgres makes
   a commit visible to new snapshots before it releases the transaction's locks.
2. So read the sequence's last value S, *then* list the transactions holding ROW EXCLUSIVE on
   ``agents_auditevent`` (``pg_locks``, by virtual transaction id, which also names
   transactions that have no xid yet). Any transaction that took an id <= S took it before S
   was read, holding the lock: it has ended, or it is on that list.
3. If the list is empty, every id <= S is settled now. Otherwise (S, list) is kept as a
   candidate; at a later pass, once none of the listed transactions holds the lock any more,
   every id <= S is settled. The events with settled ids are then read with a snapshot taken
   after that, so the ones present are all there will ever be: the rest are ids that were
   rolled back or never used, skipped for good.

Why not the rows' ``xmin`` against ``pg_snapshot_xmin``: a transaction's xid is assigned at
its first write, which has no order with the moment it takes an audit id; an event whose own
inserter is long finished says nothing about a lower id still held by a running transaction.
Why not "older than a few seconds": a transaction that holds an id longer than the delay
(a slow step, a migration) would be reported as an insertion.

This needs the identity sequence uncached (``CACHE 1``, Postgres's default): a session that
caches ids hands them out later without touching the sequence. :func:`seal` refuses to run
otherwise. Transactions are never waited for: one that stays open only holds back the seal
(a later pass takes the events), and nothing is added to the insert path.

The chain itself: seal ``n`` links event ``e`` with
``hash = HMAC-SHA256(AGENTSITE_AUDIT_KEY, prev_hash + canonical(e))`` where ``prev_hash`` is
seal ``n - 1``'s hash (64 zeros for seal 1), and ``canonical(e)`` is the compact JSON array of
the event's values as Postgres prints them: id, created_at in epoch microseconds, actor_type,
actor, action, run_id, step_index, trace_id and payload (jsonb's text form, which is
canonical), NULL as "". A verifier outside Django needs only these rules and the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.utils import timezone

from .models import AuditEvent, AuditSeal, SealHorizon

GENESIS_HASH = "0" * 64
# pg_advisory_xact_lock key for the sealer: one at a time ("audit" in ASCII).
SEALER_LOCK = 0x6175646974
# Events per sealing transaction: one SELECT, hashing in Python, one INSERT.
BATCH = 5000
EVENTS_TABLE = AuditEvent._meta.db_table
# The event's values as text, in the order they are hashed; the row's id (a number) first.
# Built from constants only (no input reaches it).
EVENTS_PAGE = f"""
    SELECT
        id,
        id::text AS id_text,
        ((extract(epoch FROM created_at) * 1000000)::bigint)::text,
        actor_type,
        actor,
        action,
        coalesce(run_id::text, ''),
        coalesce(step_index::text, ''),
        trace_id,
        payload::text
    FROM {EVENTS_TABLE}
    WHERE id > %s AND id <= %s
    ORDER BY id
    LIMIT %s
"""  # noqa: S608
ALL_IDS = 2**63 - 1


def canonical_text(values: Sequence[str]) -> str:
    """The event's values (as Postgres prints them) as one unambiguous string."""
    return json.dumps(list(values), ensure_ascii=False, separators=(",", ":"))


def link_hash(prev_hash: str, values: Sequence[str], *, key: bytes | None = None) -> str:
    """The hash a seal carries for an event whose canonical values are ``values``."""
    secret = key if key is not None else settings.AGENTSITE_AUDIT_KEY.encode()
    message = (prev_hash + canonical_text(values)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def read_events(cursor: Any, *, after_id: int, up_to: int, limit: int) -> list[tuple[Any, ...]]:
    """(id, *canonical values) of the events with ids in (after_id, up_to], in id order."""
    cursor.execute(EVENTS_PAGE, [after_id, up_to, limit])
    return list(cursor.fetchall())


def supported() -> bool:
    """The chain relies on Postgres (its locks, its sequence and its text forms)."""
    return connection.vendor == "postgresql"


def seal(batch: int = BATCH, *, wait: bool = True) -> int:
    """Append links for up to ``batch`` settled, unsealed events, in id order; how many.

    One transaction of a few statements. Sealers take turns on an advisory lock: with
    ``wait=False`` a pass that finds another sealer at work seals nothing and returns 0.
    A no-op (0) on databases other than Postgres.
    """
    if not supported():
        return 0
    with transaction.atomic(), connection.cursor() as cursor:
        if wait:
            cursor.execute(
                "SELECT true, current_setting('transaction_isolation') "
                "FROM pg_advisory_xact_lock(%s)",
                [SEALER_LOCK],
            )
        else:
            cursor.execute(
                "SELECT pg_try_advisory_xact_lock(%s), current_setting('transaction_isolation')",
                [SEALER_LOCK],
            )
        acquired, isolation = cursor.fetchone()
        if not acquired:
            return 0
        if isolation != "read committed":
            # A snapshot from before the transactions ended would miss their events.
            raise ImproperlyConfigured(
                f"audit sealing needs READ COMMITTED transactions, not {isolation}"
            )
        settled_id = _settle(cursor)
        head = AuditSeal.objects.order_by("-seq").values_list("seq", "event_id", "hash").first()
        seq, after_id, prev_hash = head if head else (0, 0, GENESIS_HASH)
        rows = read_events(cursor, after_id=after_id, up_to=settled_id, limit=batch)
        key = settings.AGENTSITE_AUDIT_KEY.encode()
        now = timezone.now()
        links = []
        for event_id, *values in rows:
            seq += 1
            digest = link_hash(prev_hash, values, key=key)
            links.append(
                AuditSeal(
                    seq=seq, event_id=event_id, prev_hash=prev_hash, hash=digest, sealed_at=now
                )
            )
            prev_hash = digest
        AuditSeal.objects.bulk_create(links)
    return len(links)


def seal_pending(*, budget_seconds: float | None = None, wait: bool = True) -> int:
    """Seal batch after batch until the settled events are all sealed; how many.

    With a budget, no batch is started after that many seconds (a backlog, such as the first
    pass over an existing trail, is then worked off over several passes). ``wait`` as for
    :func:`seal`.
    """
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    total = 0
    while True:
        sealed = seal(BATCH, wait=wait)
        total += sealed
        if sealed < BATCH or (deadline is not None and time.monotonic() > deadline):
            return total


def _settle(cursor: Any) -> int:
    """Advance the horizon (module docstring, steps 2 and 3); the highest settled id."""
    horizon, _ = SealHorizon.objects.get_or_create(pk=1)
    before = (horizon.settled_id, horizon.candidate_id, list(horizon.candidate_transactions))
    cursor.execute(
        "SELECT s.seqcache, pg_sequence_last_value(s.seqrelid) FROM pg_sequence s "
        "WHERE s.seqrelid = pg_get_serial_sequence(%s, 'id')::regclass",
        [EVENTS_TABLE],
    )
    row = cursor.fetchone()
    if row is None:
        raise ImproperlyConfigured(f"{EVENTS_TABLE}.id has no sequence to seal events by")
    cache, last_id = row
    if cache != 1:
        raise ImproperlyConfigured(
            f"the id sequence of {EVENTS_TABLE} caches {cache} values per session; sealing "
            "needs CACHE 1 (ids taken from a session's cache escape its check)"
        )
    last_id = last_id or 0  # NULL: no id handed out yet
    # Read after the sequence: see the module docstring, step 2.
    cursor.execute(
        "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}') FROM pg_locks "
        "WHERE locktype = 'relation' AND mode = 'RowExclusiveLock' "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND relation = %s::regclass AND pid IS DISTINCT FROM pg_backend_pid()",
        [EVENTS_TABLE],
    )
    inserters = set(cursor.fetchone()[0])
    if horizon.candidate_id is not None and not inserters & set(horizon.candidate_transactions):
        horizon.settled_id = max(horizon.settled_id, horizon.candidate_id)
        horizon.candidate_id, horizon.candidate_transactions = None, []
    if not inserters:
        horizon.settled_id = max(horizon.settled_id, last_id)
        horizon.candidate_id, horizon.candidate_transactions = None, []
    elif horizon.candidate_id is None:
        horizon.candidate_id, horizon.candidate_transactions = last_id, sorted(inserters)
    if (horizon.settled_id, horizon.candidate_id, horizon.candidate_transactions) != before:
        horizon.save()
    return horizon.settled_id
