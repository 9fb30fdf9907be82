"""What a model call costs: prices per route, per million input and output tokens.

``ModelPrice`` rows (admin) per route, then ``provider:*`` rows, then AGENTSITE_MODEL_PRICES
from the environment. A run with a cost limit refuses to call a model with no price (it could
not keep the limit).
"""

from __future__ import annotations

import threading
import time
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings

from agents.models import ModelPrice

MILLION = Decimal(1_000_000)
CENT_MILLIONTHS = Decimal("0.000001")

_PRICE_TTL = 10.0  # seconds an edit in the admin takes to reach every worker
_prices_lock = threading.Lock()
_prices: tuple[float, dict[str, tuple[Decimal, Decimal]]] = (0.0, {})


def _table() -> dict[str, tuple[Decimal, Decimal]]:
    global _prices
    with _prices_lock:
        loaded_at, table = _prices
        if time.monotonic() - loaded_at < _PRICE_TTL:
            return table
    table = dict(settings.AGENTSITE_MODEL_PRICES)
    for row in ModelPrice.objects.all():
        table[row.route] = (row.input_per_million, row.output_per_million)
    with _prices_lock:
        _prices = (time.monotonic(), table)
    return table


def forget_prices() -> None:
    """Drop this process's cached price table (after an edit, and in tests)."""
    global _prices
    with _prices_lock:
        _prices = (0.0, {})


def price_of(route: str) -> tuple[Decimal, Decimal] | None:
    """(input, output) per million tokens for ``route``, or None if it has no price."""
    table = _table()
    provider = route.partition(":")[0]
    return table.get(route) or table.get(f"{provider}:*")


def money(value: Decimal) -> Decimal:
    """An amount rounded to the millionth, as costs are kept."""
    return value.quantize(CENT_MILLIONTHS, rounding=ROUND_HALF_UP)


def cost_of(route: str, input_tokens: int, output_tokens: int) -> Decimal | None:
    """What a call cost, or None when the route has no price."""
    price = price_of(route)
    if price is None:
        return None
    return money((input_tokens * price[0] + output_tokens * price[1]) / MILLION)
