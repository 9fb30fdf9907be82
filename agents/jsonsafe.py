"""Making values safe for Postgres before they are stored.

Postgres text and jsonb refuse the NUL character, and jsonb refuses NaN and Infinity; a model or a
tool that produces them must not make recording its step fail (which would leave the step
running until its lease expires, and repeat it).
"""

from __future__ import annotations

import math
from typing import Any

MAX_COUNT = 2**31 - 1


def json_safe(value: Any) -> Any:
    """``value`` with NUL characters removed from every string and non-finite floats as None."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    return value


def count(value: Any) -> int:
    """A token count a server reported, clamped to what the columns hold."""
    try:
        return max(0, min(int(value), MAX_COUNT))
    except (TypeError, ValueError):
        return 0
