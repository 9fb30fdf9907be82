"""Walking the seal chain against the audit events, naming every place where they disagree.

Both are read in order, a chunk at a time (keyset pages), side by side: seals by ``seq``,
events by id. A seal whose event is gone means the event was removed; an event below the last
seal that no seal covers was slipped in; a hash that does not match means the event (or the
seal) was changed; a jump in ``seq`` means seals were removed. Seals hold the previous seal's
hash, so a changed seal is told apart from a changed event by the links on either side.
What none of this can see is the *tail* cut off together with its seals: compare the head
with one recorded elsewhere (``expect_head``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from .chain import ALL_IDS, EVENTS_TABLE, GENESIS_HASH, link_hash, read_events
from .models import AuditSeal

CHUNK = 5000


@dataclass(frozen=True)
class Head:
    seq: int
    event_id: int
    hash: str


@dataclass
class _Link:
    """A seal as walked: whether its event matched (None: no event to check) and whether its
    prev_hash is its predecessor's hash (True when there is no predecessor to compare with)."""

    seq: int
    event_id: int
    hash: str
    event_ok: bool | None
    linked: bool
    # Its broken link was already reported, as part of its predecessor being altered.
    link_explained: bool = False


@dataclass
class Verification:
    """One walk of the chain. Iterate :meth:`problems`; the counts are final once it ends."""

    expect_head: tuple[int, str] | None = None
    events: int = 0
    sealed: int = 0
    # Events past the last seal, not sealed yet (not a problem: the sealer is behind).
    recent: int = 0
    head: Head | None = None
    problem_count: int = 0
    # For the hint that the key, not the events, changed: seals checked against an event,
    # how many failed, and how many links were broken.
    _checked: int = field(default=0, init=False, repr=False)
    _hash_failures: int = field(default=0, init=False, repr=False)
    _link_failures: int = field(default=0, init=False, repr=False)
    # The hash of seal expect_head[0], when the walk passes it.
    _expected_seen: str | None = field(default=None, init=False, repr=False)

    def problems(self) -> Iterator[str]:
        """Each problem, one line, as it is found (in one snapshot, where the caller has no
        transaction of its own)."""
        with _snapshot():
            for problem in self._walk():
                self.problem_count += 1
                yield problem

    def _walk(self) -> Iterator[str]:
        ceiling = _last_event_id()  # read after the snapshot: no event seen is above it
        key = settings.AGENTSITE_AUDIT_KEY.encode()
        events = _events()
        event = next(events, None)
        prev: _Link | None = None
        for seq, event_id, prev_hash, seal_hash in _seals():
            self.sealed += 1
            self.head = Head(seq, event_id, seal_hash)
            if self.expect_head and seq == self.expect_head[0]:
                self._expected_seen = seal_hash
            contiguous = seq == (prev.seq + 1 if prev else 1)
            linked = not contiguous or prev_hash == (prev.hash if prev else GENESIS_HASH)
            explained = False
            if prev is not None:
                for problem, neither in self._judge(prev, next_linked=linked):
                    explained = explained or neither
                    yield problem
            if prev is not None and event_id <= prev.event_id:
                yield (
                    f"seal {seq} altered (it points to event {event_id}, not after seal "
                    f"{prev.seq}'s event {prev.event_id})"
                )
                prev = _Link(seq, event_id, seal_hash, None, linked, explained)
                continue
            unsealed = 0
            while event is not None and event[0] < event_id:
                self.events += 1
                if contiguous:
                    where = f"between seal {prev.seq} and seal {seq}" if prev else "before seal 1"
                    yield f"event {event[0]} inserted outside the chain ({where})"
                else:
                    unsealed += 1
                event = next(events, None)
            if not contiguous:
                yield _removed_seals(prev.seq if prev else 0, seq, unsealed)
            if event is not None and event[0] == event_id:
                self.events += 1
                self._checked += 1
                event_ok = link_hash(prev_hash, event[1:], key=key) == seal_hash
                self._hash_failures += 0 if event_ok else 1
                event = next(events, None)
            else:
                yield f"event {event_id} removed (seal {seq} points to it)"
                event_ok = None
            prev = _Link(seq, event_id, seal_hash, event_ok, linked, explained)
        if prev is not None:
            for problem, _ in self._judge(prev, next_linked=True):
                yield problem
        yield from self._tail(event, events, ceiling)
        yield from self._head_problems()
        if self._checked and self._hash_failures == self._checked and not self._link_failures:
            yield (
                "every seal fails its hash while the seals link up: AGENTSITE_AUDIT_KEY is not "
                "the key the chain was sealed with (or every event was altered)"
            )

    def _judge(self, link: _Link, *, next_linked: bool) -> Iterator[tuple[str, bool]]:
        """The problems of a seal, once the next seal's link is known; each with whether it
        explains the next seal's broken link."""
        before = f"seal {link.seq - 1}'s hash" if link.seq > 1 else "64 zeros, the chain's start"
        if not link.linked:
            self._link_failures += 1
        if link.event_ok is False:
            if not link.linked:
                yield f"seal {link.seq} altered (its prev_hash is not {before})", False
            elif not next_linked:
                yield (
                    f"seal {link.seq} altered (its hash matches neither event {link.event_id} "
                    f"nor seal {link.seq + 1}'s prev_hash)",
                    True,
                )
            else:
                yield (
                    f"event {link.event_id} altered (its hash does not match seal {link.seq})",
                    False,
                )
        elif not link.linked and not link.link_explained:
            yield (
                f"the chain breaks at seal {link.seq} (its prev_hash is not {before})",
                False,
            )

    def _tail(
        self, event: tuple[Any, ...] | None, events: Iterator[tuple[Any, ...]], ceiling: int
    ) -> Iterator[str]:
        """Events past the last seal: recent, unless the id sequence never handed out their id."""
        above: list[int] = []
        while event is not None:
            self.events += 1
            if event[0] > ceiling:
                above.append(event[0])
            else:
                self.recent += 1
            event = next(events, None)
        if above:
            ceiling = _last_event_id()  # outside one snapshot, later events may be legitimate
        for event_id in above:
            if event_id > ceiling:
                yield (
                    f"event {event_id} inserted outside the chain (its id was never handed out "
                    "by the id sequence)"
                )
            else:
                self.recent += 1

    def _head_problems(self) -> Iterator[str]:
        if self.expect_head is None:
            return
        seq, expected = self.expect_head
        if self.head is None:
            yield f"the chain has no seals, but the expected head is seal {seq}"
        elif seq > self.head.seq:
            yield (
                f"the chain's last seal is {self.head.seq}, but the expected head is seal {seq} "
                "(seals were removed from the tail)"
            )
        elif self._expected_seen is None:
            yield f"seal {seq}, the expected head, is missing"
        elif self._expected_seen != expected:
            yield (
                f"seal {seq}'s hash is {self._expected_seen[:16]}…, not the expected head's "
                f"{expected[:16]}… (the chain was rewritten)"
            )


def _removed_seals(before: int, after: int, unsealed: int) -> str:
    first, last = before + 1, after - 1
    which = f"seal {first}" if first == last else f"seals {first}-{last}"
    where = (
        f"the chain breaks between seal {before} and seal {after}"
        if before
        else f"the chain starts at seal {after}"
    )
    lost = f"; {unsealed} events there are no longer sealed" if unsealed else ""
    return f"{which} removed ({where}{lost})"


@contextmanager
def _snapshot() -> Iterator[None]:
    """One read-only REPEATABLE READ transaction, so the pages of events and seals agree; inside
    a transaction of the caller's (a test's), that one."""
    if connection.in_atomic_block:
        yield
        return
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


def _last_event_id() -> int:
    """The last id the events' sequence handed out (0 if none)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence(%s, 'id')), 0)",
            [EVENTS_TABLE],
        )
        return int(cursor.fetchone()[0])


def _events() -> Iterator[tuple[Any, ...]]:
    """(id, *canonical values) of every event, in id order."""
    after = 0
    while True:
        with connection.cursor() as cursor:
            rows = read_events(cursor, after_id=after, up_to=ALL_IDS, limit=CHUNK)
        yield from rows
        if len(rows) < CHUNK:
            return
        after = rows[-1][0]


def _seals() -> Iterator[tuple[int, int, str, str]]:
    """(seq, event_id, prev_hash, hash) of every seal, in seq order."""
    after = 0
    while True:
        rows = list(
            AuditSeal.objects.filter(seq__gt=after)
            .order_by("seq")
            .values_list("seq", "event_id", "prev_hash", "hash")[:CHUNK]
        )
        yield from rows
        if len(rows) < CHUNK:
            return
        after = rows[-1][0]
