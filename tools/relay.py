"""The outbox relay: delivers the side effects tools recorded in ``OutboxMessage``.

Delivery guarantee
------------------
*Recording* is exactly-once per tool call: ``tools.outbox.record`` keys the row by the call's
idempotency key, so retries and redeliveries of the call find the row instead of adding one.

*Delivery* is at-least-once. Each row is claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` in
its own transaction, sent while the row lock is held, and marked delivered in the same
transaction. Relays running at once (several workers, several hosts) therefore never send the
same row concurrently: a locked row is skipped by the others. But the send happens before the
commit, so a crash, a killed worker or a lost database connection between the two leaves the
row pending and it is sent again on a later pass. Every e-mail carries a ``Message-ID`` derived
from the idempotency key (``<sha256(key)@agentsite>``), identical on every attempt, so receivers
(and anyone reading logs) can recognise such a repeat as the same message.

Because the attempt counter is part of the same transaction, a crash during a send does not
count as an attempt. A send that fails with an error records ``last_error`` and leaves the row
pending for a later pass, until ``AGENTSITE_OUTBOX_MAX_ATTEMPTS`` (default 5) attempts have
failed; then the row is ``failed`` and left for an operator. A row whose payload cannot be
delivered at all (it does not validate) fails at once. Rows of a kind this relay does not know
are left pending and untouched (logged once per pass).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.core.mail.backends.base import BaseEmailBackend
from django.db import transaction
from django.db.models import Count
from django.utils import timezone
from pydantic import ValidationError

from agentsite.metrics import bounded

from .email import SendEmailArgs
from .metrics import OUTBOX_DELIVERIES
from .models import OutboxMessage

logger = logging.getLogger(__name__)

MESSAGE_ID_DOMAIN = "agentsite"
_MAX_ERROR = 2000


class PermanentDeliveryError(Exception):
    """The row can never be delivered as it is (e.g. its payload is malformed): no retry."""


def message_id(idempotency_key: str) -> str:
    """The stable ``Message-ID`` of the e-mail recorded under ``idempotency_key``."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"<{digest}@{MESSAGE_ID_DOMAIN}>"


def _deliver_email(row: OutboxMessage, connection: BaseEmailBackend) -> None:
    try:
        args = SendEmailArgs.model_validate(row.payload)
    except ValidationError as exc:
        raise PermanentDeliveryError(f"invalid e-mail payload: {exc}") from None
    email = EmailMessage(
        subject=args.subject,
        body=args.body,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=args.to,
        cc=args.cc,
        connection=connection,
        headers={
            "Message-ID": message_id(row.idempotency_key),
            # RFC 3834: machine-generated, so auto-responders should not answer it.
            "Auto-Submitted": "auto-generated",
        },
    )
    sent = email.send(fail_silently=False)
    if sent != 1:
        raise RuntimeError(f"the e-mail backend reported {sent} messages sent, expected 1")


Deliverer = Callable[[OutboxMessage, BaseEmailBackend], None]
DELIVERERS: dict[str, Deliverer] = {"email": _deliver_email}


def _max_attempts() -> int:
    return max(1, int(getattr(settings, "AGENTSITE_OUTBOX_MAX_ATTEMPTS", 5)))


def _log_unknown_kinds() -> None:
    unknown = (
        OutboxMessage.objects.filter(status=OutboxMessage.Status.PENDING)
        .exclude(kind__in=list(DELIVERERS))
        .values("kind")
        .annotate(n=Count("pk"))
        .order_by("kind")
    )
    for entry in unknown:
        logger.warning(
            "outbox: %d pending message(s) of kind %r, which this relay cannot deliver; "
            "left pending",
            entry["n"],
            entry["kind"],
        )


def _count(kind: str, outcome: str) -> None:
    """Count a delivery once the row's new state is committed."""
    transaction.on_commit(
        lambda: OUTBOX_DELIVERIES.labels(bounded("outbox_kind", kind), outcome).inc()
    )


def _deliver_one(
    connection: BaseEmailBackend, tried: set[int], max_attempts: int
) -> tuple[bool, bool]:
    """Claim and deliver the oldest pending row not yet tried in this pass.

    Returns (claimed a row, delivered it).
    """
    with transaction.atomic():
        row = (
            OutboxMessage.objects.select_for_update(skip_locked=True)
            .filter(status=OutboxMessage.Status.PENDING, kind__in=list(DELIVERERS))
            .exclude(pk__in=tried)
            .order_by("created_at", "pk")
            .first()
        )
        if row is None:
            return False, False
        tried.add(row.pk)
        row.attempts += 1
        try:
            # A savepoint: a deliverer that fails in the database leaves this transaction usable.
            with transaction.atomic():
                DELIVERERS[row.kind](row, connection)
        except Exception as exc:
            row.last_error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
            permanent = isinstance(exc, PermanentDeliveryError)
            if permanent or row.attempts >= max_attempts:
                row.status = OutboxMessage.Status.FAILED
            logger.warning(
                "outbox: delivering %s %s (attempt %d) failed%s: %s",
                row.kind,
                row.pk,
                row.attempts,
                "; giving up" if row.status == OutboxMessage.Status.FAILED else "",
                row.last_error,
            )
            row.save(update_fields=["attempts", "last_error", "status"])
            outcome = "failed" if row.status == OutboxMessage.Status.FAILED else "retry"
            _count(row.kind, outcome)
            return True, False
        _count(row.kind, "delivered")
        row.status = OutboxMessage.Status.DELIVERED
        row.delivered_at = timezone.now()
        row.last_error = ""
        row.save(update_fields=["attempts", "last_error", "status", "delivered_at"])
        return True, True


def deliver_pending(*, limit: int = 100) -> int:
    """Deliver up to ``limit`` pending outbox rows (oldest first); returns how many were sent.

    Safe to run in several processes at once: each row is sent while its row lock is held and
    the others skip it. Each row is tried at most once per pass; a failed row waits for the next
    pass. See the module docstring for the delivery guarantee (at-least-once, stable
    ``Message-ID``).
    """
    _log_unknown_kinds()
    max_attempts = _max_attempts()
    connection = get_connection(fail_silently=False)
    tried: set[int] = set()
    delivered = 0
    for _ in range(max(0, limit)):
        claimed, sent = _deliver_one(connection, tried, max_attempts)
        if not claimed:
            break
        delivered += sent
    return delivered
