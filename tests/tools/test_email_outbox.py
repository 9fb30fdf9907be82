"""The ``send_email`` tool records e-mails in the outbox once; the relay delivers them."""

from __future__ import annotations

import logging
import smtplib
import threading
from typing import Any
from uuid import uuid4

import pytest
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.db import connection
from pydantic import ValidationError

from tools import relay
from tools.email import SendEmailArgs, send_email
from tools.models import OutboxMessage
from tools.registry import ToolArgumentsInvalid, ToolContext, registry

BACKEND = f"{__name__}.SelectiveFailingBackend"
GATED_BACKEND = f"{__name__}.GatedBackend"


class SelectiveFailingBackend(LocmemBackend):
    """The locmem backend, except that a message to any ``fail@...`` address raises."""

    def send_messages(self, messages: Any) -> int:
        for message in messages:
            if any(r.startswith("fail@") for r in message.recipients()):
                raise smtplib.SMTPServerDisconnected("connection unexpectedly closed")
        return super().send_messages(messages)


class GatedBackend(LocmemBackend):
    """The locmem backend whose first send in each thread waits at ``GatedBackend.gate``.

    With a two-party barrier, both relays must be inside a send at the same moment: proof that
    they ran concurrently and each held a different row.
    """

    gate: threading.Barrier | None = None
    local = threading.local()

    def send_messages(self, messages: Any) -> int:
        if self.gate is not None and not getattr(self.local, "passed", False):
            self.local.passed = True
            self.gate.wait(timeout=20)
        return super().send_messages(messages)


def ctx(key: str = "k1") -> ToolContext:
    return ToolContext(
        run_id=str(uuid4()), step_index=1, idempotency_key=key, attempt=1, tool="send_email"
    )


def args(**fields: Any) -> SendEmailArgs:
    values: dict[str, Any] = {
        "to": ["ana@example.com"],
        "subject": "Your order",
        "body": "It shipped today.\nRegards",
    }
    values.update(fields)
    return SendEmailArgs.model_validate(values)


def outbox_row(key: str, to: str = "ana@example.com", **payload: Any) -> OutboxMessage:
    return OutboxMessage.objects.create(
        idempotency_key=key,
        tool="send_email",
        kind="email",
        destination=to,
        payload={"to": [to], "cc": [], "subject": f"subject {key}", "body": "body", **payload},
    )


# --- the arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "not-an-address",
        "ana@",
        "@example.com",
        "ana@@example.com",
        "Ana <ana@example.com>",
        "ana@example.com\nBcc: eve@evil.example",
        "ana@example.com, eve@evil.example",
        "",
    ],
)
def test_args_refuse_a_bad_address(address):
    with pytest.raises(ValidationError):
        args(to=[address])
    with pytest.raises(ValidationError):
        args(cc=[address])


@pytest.mark.parametrize(
    "subject", ["Hello\nBcc: eve@evil.example", "Hello\r\nX: y", "Hi\rthere", "a\u2028b", "", " "]
)
def test_args_refuse_a_multi_line_or_blank_subject(subject):
    with pytest.raises(ValidationError):
        args(subject=subject)


def test_args_refuse_empty_or_too_many_recipients_and_bad_lengths():
    with pytest.raises(ValidationError):
        args(to=[])
    with pytest.raises(ValidationError):
        args(to=[f"user{i}@example.com" for i in range(11)])
    with pytest.raises(ValidationError):
        args(subject="x" * 201)
    with pytest.raises(ValidationError):
        args(body="")
    with pytest.raises(ValidationError):
        args(body="x" * 20_001)


def test_args_accept_and_normalise_good_addresses():
    parsed = args(
        to=[" Ana@Example.COM ", "ana@example.com", "bo.b+tag@sub.example.org"],
        cc=["carl@example.net"],
        subject="x" * 200,
    )
    assert parsed.to == ["Ana@example.com", "bo.b+tag@sub.example.org"]
    assert parsed.cc == ["carl@example.net"]


def test_registered_spec_is_a_side_effecting_tool_that_needs_approval():
    spec = registry.get("send_email")
    assert spec is not None and spec.func is send_email
    assert spec.side_effects is True
    assert spec.default_mode == "require_approval"
    assert spec.risk == "high"
    assert (spec.timeout, spec.retries) == (10, 2)
    assert spec.parameters_schema()["required"] == ["to", "subject", "body"]
    with pytest.raises(ToolArgumentsInvalid):
        spec.validate({"to": ["ana@example.com"], "subject": "a\nb", "body": "x"})


# --- recording -------------------------------------------------------------------------------


def test_same_idempotency_key_records_one_message(db):
    call = ctx("run-a:1")
    first = send_email(args(), call)
    second = send_email(args(subject="Changed on retry"), call)

    assert OutboxMessage.objects.count() == 1
    row = OutboxMessage.objects.get()
    assert first == {
        "queued": True,
        "outbox_id": row.pk,
        "duplicate": False,
        "to": row.payload["to"],
    }
    assert second["duplicate"] is True and second["outbox_id"] == row.pk
    assert row.kind == "email" and row.tool == "send_email" and row.status == "pending"
    assert row.destination == "ana@example.com"
    assert row.payload == {
        "to": ["ana@example.com"],
        "cc": [],
        "subject": "Your order",  # what was recorded first is what will be sent
        "body": "It shipped today.\nRegards",
    }


def test_different_idempotency_keys_record_two_messages(db):
    one = send_email(args(), ctx("run-a:1"))
    two = send_email(args(), ctx("run-a:2"))
    assert one["outbox_id"] != two["outbox_id"]
    assert not one["duplicate"] and not two["duplicate"]
    assert OutboxMessage.objects.count() == 2


def test_cc_is_held_to_the_domains_the_grant_allows_for_to(db):
    limited = ToolContext(
        run_id=str(uuid4()),
        step_index=1,
        idempotency_key="k-cc",
        attempt=1,
        tool="send_email",
        constraints={"to": {"email_domains": ["example.com"]}},
    )
    with pytest.raises(ToolArgumentsInvalid, match="evil.example"):
        send_email(args(cc=["eve@evil.example"]), limited)
    assert not OutboxMessage.objects.exists()
    assert send_email(args(cc=["bo@example.com"]), limited)["queued"] is True


# --- delivery --------------------------------------------------------------------------------


def test_deliver_pending_sends_each_email_once(db, mailoutbox, settings):
    settings.DEFAULT_FROM_EMAIL = "agents@agentsite.example"
    send_email(args(cc=["carl@example.net"]), ctx("run-a:1"))
    send_email(args(to=["bo@example.org"], subject="Second"), ctx("run-a:2"))

    assert relay.deliver_pending() == 2

    assert len(mailoutbox) == 2
    by_subject = {m.subject: m for m in mailoutbox}
    first = by_subject["Your order"]
    assert first.to == ["ana@example.com"] and first.cc == ["carl@example.net"]
    assert first.body == "It shipped today.\nRegards"
    assert first.from_email == "agents@agentsite.example"
    headers = first.message()
    assert headers["Message-ID"] == relay.message_id("run-a:1")
    assert headers["Message-ID"].startswith("<") and headers["Message-ID"].endswith("@agentsite>")
    assert by_subject["Second"].message()["Message-ID"] == relay.message_id("run-a:2")
    for row in OutboxMessage.objects.all():
        assert row.status == "delivered" and row.attempts == 1 and row.delivered_at is not None

    assert relay.deliver_pending() == 0
    assert len(mailoutbox) == 2


def test_deliver_pending_respects_the_limit(db, mailoutbox):
    for i in range(3):
        outbox_row(f"key-{i}")
    assert relay.deliver_pending(limit=2) == 2
    assert len(mailoutbox) == 2
    assert OutboxMessage.objects.filter(status="pending").count() == 1
    assert relay.deliver_pending(limit=2) == 1
    assert len(mailoutbox) == 3


def test_failures_are_retried_up_to_the_max_then_failed(db, mailoutbox, settings):
    settings.EMAIL_BACKEND = BACKEND
    settings.AGENTSITE_OUTBOX_MAX_ATTEMPTS = 3
    bad = outbox_row("bad", to="fail@example.com")
    good = outbox_row("good")

    # The failing row does not hold up the others, and is tried once per pass.
    assert relay.deliver_pending() == 1
    bad.refresh_from_db()
    assert bad.status == "pending" and bad.attempts == 1
    assert "SMTPServerDisconnected" in bad.last_error and bad.delivered_at is None
    good.refresh_from_db()
    assert good.status == "delivered"

    assert relay.deliver_pending() == 0
    bad.refresh_from_db()
    assert bad.status == "pending" and bad.attempts == 2

    assert relay.deliver_pending() == 0
    bad.refresh_from_db()
    assert bad.status == "failed" and bad.attempts == 3

    assert relay.deliver_pending() == 0  # a failed row is not tried again
    bad.refresh_from_db()
    assert bad.status == "failed" and bad.attempts == 3
    assert [m.to for m in mailoutbox] == [["ana@example.com"]]


def test_a_row_that_failed_once_is_delivered_later(db, mailoutbox, settings):
    settings.EMAIL_BACKEND = BACKEND
    row = outbox_row("flaky", to="fail@example.com")
    assert relay.deliver_pending() == 0

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert relay.deliver_pending() == 1
    row.refresh_from_db()
    assert row.status == "delivered" and row.attempts == 2 and row.last_error == ""
    assert len(mailoutbox) == 1
    assert mailoutbox[0].message()["Message-ID"] == relay.message_id("flaky")


def test_an_invalid_payload_fails_at_once(db, mailoutbox):
    row = outbox_row("broken", subject="two\nlines")
    assert relay.deliver_pending() == 0
    row.refresh_from_db()
    assert row.status == "failed" and row.attempts == 1
    assert "invalid e-mail payload" in row.last_error
    assert mailoutbox == []


def test_unknown_kinds_are_left_alone(db, mailoutbox, caplog):
    sms = OutboxMessage.objects.create(
        idempotency_key="sms-1", tool="send_sms", kind="sms", payload={"text": "hi"}
    )
    OutboxMessage.objects.create(
        idempotency_key="sms-2", tool="send_sms", kind="sms", payload={"text": "hi"}
    )
    outbox_row("mail-1")
    with caplog.at_level(logging.WARNING, logger="tools.relay"):
        assert relay.deliver_pending() == 1
    sms.refresh_from_db()
    assert sms.status == "pending" and sms.attempts == 0 and sms.last_error == ""
    warnings = [r for r in caplog.records if "'sms'" in r.getMessage()]
    assert len(warnings) == 1 and "2 pending" in warnings[0].getMessage()


# --- concurrency (needs real row locks: Postgres) --------------------------------------------


def test_concurrent_relays_send_each_message_exactly_once(transactional_db, mailoutbox, settings):
    if connection.vendor != "postgresql":
        pytest.skip("SELECT ... FOR UPDATE SKIP LOCKED needs Postgres")
    settings.EMAIL_BACKEND = GATED_BACKEND
    GatedBackend.gate = threading.Barrier(2)
    keys = [f"concurrent-{i}" for i in range(20)]
    for key in keys:
        outbox_row(key)

    results: list[int] = []
    errors: list[BaseException] = []

    def relay_pass() -> None:
        try:
            results.append(relay.deliver_pending())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=relay_pass) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        GatedBackend.gate = None

    assert not errors
    assert not any(t.is_alive() for t in threads)
    # Both relays were inside a send at the same time, and each delivered something.
    assert len(results) == 2 and all(n >= 1 for n in results), results
    assert sum(results) == 20
    sent_ids = sorted(m.message()["Message-ID"] for m in mailoutbox)
    assert sent_ids == sorted(relay.message_id(k) for k in keys)  # each once, none twice
    assert set(OutboxMessage.objects.values_list("status", "attempts")) == {("delivered", 1)}
