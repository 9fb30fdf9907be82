"""A demo tool for the refund-agent (seed_demo): a refund recorded in the outbox, nothing paid."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

from .models import OutboxMessage
from .outbox import record
from .registry import ToolContext, tool
from .relay import DELIVERERS

logger = logging.getLogger(__name__)


class IssueRefundArgs(BaseModel):
    order_id: str = Field(pattern=r"^[A-Z0-9-]{3,40}$", description="The order to refund.")
    amount: Decimal = Field(gt=0, max_digits=10, decimal_places=2, description="In EUR.")
    reason: str = Field(min_length=1, max_length=500, description="Why, for the customer.")


@tool(
    name="issue_refund",
    description=(
        "Refund an order (demo: the refund is recorded in the outbox; no money moves). "
        "Large refunds wait for a human reviewer."
    ),
    risk="high",
    timeout=10,
    retries=2,
    side_effects=True,
)
def issue_refund(args: IssueRefundArgs, ctx: ToolContext) -> dict[str, Any]:
    message, created = record(
        ctx,
        kind="refund",
        destination=args.order_id,
        payload={"order_id": args.order_id, "amount": str(args.amount), "reason": args.reason},
    )
    return {
        "refunded": True,
        "order_id": args.order_id,
        "amount": str(args.amount),
        "outbox_id": message.pk,
        "duplicate": not created,
    }


def _deliver_refund(row: OutboxMessage, connection: Any) -> None:
    """The demo's payment provider: it only logs (a real one would call the payment API with the
    row's idempotency key, so a resend is not a second refund)."""
    logger.info(
        "demo refund of %s EUR for order %s (key %s): no money moved",
        row.payload.get("amount"),
        row.payload.get("order_id"),
        row.idempotency_key,
    )


DELIVERERS["refund"] = _deliver_refund
