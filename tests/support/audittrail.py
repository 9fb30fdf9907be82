"""The audit trail tests' tools: recording events, tampering, running verify_audit, a writer
that keeps its transaction open."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

from django.core.management import CommandError, call_command
from django.db import connection, transaction

from audittrail.models import AuditEvent
from audittrail.writer import Actor, record


def add_events(count: int, action: str = "test.event", **payload: Any) -> list[int]:
    """Record ``count`` events as the application does (each committed); their ids."""
    before = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    for n in range(count):
        record(action, by=Actor.system("tests"), payload={"n": n, **payload})
    return list(
        AuditEvent.objects.filter(id__gt=before).order_by("id").values_list("id", flat=True)
    )


@contextmanager
def triggers_off() -> Iterator[Any]:
    """A cursor on which the append-only triggers do not fire (as a superuser could do);
    they fire again afterwards whatever happens."""
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
        try:
            yield cursor
        finally:
            cursor.execute("SET session_replication_role = DEFAULT")


def verify(*args: str) -> tuple[int, str, str]:
    """Run verify_audit: (exit status, stdout, stderr with the final error line)."""
    out, err = StringIO(), StringIO()
    try:
        call_command("verify_audit", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue() + f"CommandError: {exc}\n"
    return 0, out.getvalue(), err.getvalue()


class OpenWriter:
    """Another connection that records an event in a transaction it keeps open until
    :meth:`finish`, like an agent step still running."""

    def __init__(self, action: str = "slow.writer") -> None:
        self._inserted = threading.Event()
        self._release = threading.Event()
        self._commit = True
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(action,))
        self._thread.start()
        assert self._inserted.wait(10), f"the writer did not record its event: {self.error}"

    def _run(self, action: str) -> None:
        try:
            with transaction.atomic():
                record(action, by=Actor.system("tests"))
                self._inserted.set()
                assert self._release.wait(10)
                if not self._commit:
                    transaction.set_rollback(True)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            connection.close()

    def finish(self, *, commit: bool = True) -> None:
        self._commit = commit
        self._release.set()
        self._thread.join(10)
        assert not self._thread.is_alive() and self.error is None, self.error

    @property
    def open(self) -> bool:
        return not self._release.is_set()
