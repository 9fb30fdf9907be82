"""The built-in ``send_email`` tool: it records an e-mail in the outbox, the relay sends it.

The tool never talks to a mail server. It writes the message to ``OutboxMessage`` under the
call's idempotency key (``tools.outbox.record``), so a retried or redelivered call queues the
e-mail once; ``tools.relay.deliver_pending`` delivers it later with Django's mail API.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from pydantic import AfterValidator, BaseModel, Field, field_validator

from . import constraints as grant_constraints
from .outbox import record
from .registry import ToolArgumentsInvalid, ToolContext, tool

MAX_RECIPIENTS = 10
MAX_SUBJECT = 200
MAX_BODY = 20_000
# Line breaks Python's e-mail package (or a mail client) may honour besides CR and LF.
_LINE_BREAKS = {"\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def _address(value: str) -> str:
    """A bare ``local@domain`` address (no display name, no control characters)."""
    value = value.strip()
    if any(unicodedata.category(ch) == "Cc" or ch in _LINE_BREAKS for ch in value):
        raise ValueError("an e-mail address cannot contain control characters or line breaks")
    try:
        validate_email(value)
    except DjangoValidationError:
        raise ValueError(f"{value!r} is not a valid e-mail address") from None
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


EmailAddress = Annotated[
    str,
    Field(max_length=254, json_schema_extra={"format": "email"}),
    AfterValidator(_address),
]


def _unique(addresses: list[str]) -> list[str]:
    seen: set[str] = set()
    unique: list[str] = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique


class SendEmailArgs(BaseModel):
    to: list[EmailAddress] = Field(
        min_length=1,
        max_length=MAX_RECIPIENTS,
        description="Recipient addresses (1 to 10), bare addresses like 'ana@example.com'.",
    )
    subject: str = Field(
        min_length=1, max_length=MAX_SUBJECT, description="One line, at most 200 characters."
    )
    body: str = Field(
        min_length=1, max_length=MAX_BODY, description="Plain-text body, at most 20000 characters."
    )
    cc: list[EmailAddress] = Field(
        default_factory=list,
        max_length=MAX_RECIPIENTS,
        description="Optional carbon-copy addresses (at most 10).",
    )

    @field_validator("to", "cc")
    @classmethod
    def _deduplicated(cls, value: list[str]) -> list[str]:
        return _unique(value)

    @field_validator("subject")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # A line break in a header is header injection (e.g. a smuggled "Bcc:").
        if any(unicodedata.category(ch) == "Cc" or ch in _LINE_BREAKS for ch in value):
            raise ValueError("the subject must be one line without control characters")
        value = value.strip()
        if not value:
            raise ValueError("the subject cannot be blank")
        return value

    @field_validator("body")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("the body cannot contain NUL characters")
        if not value.strip():
            raise ValueError("the body cannot be blank")
        return value


def _recipient_problem(args: SendEmailArgs, constraints: dict[str, Any]) -> str | None:
    """Check the grant's constraints again, and hold ``cc`` to the domains allowed for ``to``.

    The engine checks the constraints before the call; a grant that limits ``to`` to some
    domains but says nothing of ``cc`` must not be sidestepped by copying someone else in.
    """
    effective = dict(constraints)
    to_domains = (effective.get("to") or {}).get("email_domains")
    if to_domains and "cc" not in effective:
        effective["cc"] = {"email_domains": to_domains}
    return grant_constraints.check(args.model_dump(), effective)


@tool(
    name="send_email",
    description=(
        "Send a plain-text e-mail. It is queued and delivered shortly after; the result says "
        "whether it was queued. Calling again for the same request does not send it twice."
    ),
    risk="high",
    timeout=10,
    retries=2,
    side_effects=True,
    requires_approval=True,
)
def send_email(args: SendEmailArgs, ctx: ToolContext) -> dict[str, Any]:
    # Every grant that applies (the run's version and the current one) must allow the mail.
    for constraints in ctx.all_constraint_sets():
        problem = _recipient_problem(args, dict(constraints or {}))
        if problem:
            raise ToolArgumentsInvalid(problem)
    payload = {"to": args.to, "cc": args.cc, "subject": args.subject, "body": args.body}
    message, created = record(
        ctx, kind="email", destination=", ".join(args.to)[:500], payload=payload
    )
    # A repeated call reports what was recorded the first time: that is what will be sent.
    recorded = message.payload if isinstance(message.payload, dict) else {}
    return {
        "queued": True,
        "outbox_id": message.pk,
        "duplicate": not created,
        "to": list(recorded.get("to", args.to)),
    }
