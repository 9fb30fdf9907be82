"""Making values safe for Postgres before they are stored.

Postgres text and jsonb refuse the NUL character, and jsonb refuses NaN and Infinity; a model or a
tool that produces them must not make recording its step fail (which would leave the step
running until its lease expires, and repeat it). ``unstorable`` says why a client's value would
be refused (lone UTF-16 surrogates and too deep nesting too), so it is refused before any write.
"""

from __future__ import annotations

import math
import re
from typing import Any

from django.conf import settings

MAX_COUNT = 2**31 - 1
_SURROGATE = re.compile(r"[\ud800-\udfff]")


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


def unstorable(value: Any, *, max_depth: int | None = None) -> str:
    """Why ``value`` cannot be stored as JSON in Postgres, or "": arrays and objects nested
    deeper than ``max_depth`` (default ``AGENTSITE_MAX_JSON_DEPTH``), a NUL character or a lone
    UTF-16 surrogate in a string or key, NaN or Infinity.

    Iterative, so a value of any depth (even one that contains itself) is safe to check.
    """
    limit = settings.AGENTSITE_MAX_JSON_DEPTH if max_depth is None else max_depth
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "must not contain NUL characters"
            found = _SURROGATE.search(item)
            if found:
                return f"must not contain surrogate characters (U+{ord(found.group()):X})"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "must not contain NaN or Infinity"
        elif isinstance(item, dict | list | tuple):
            if depth >= limit:
                return f"must not nest more than {limit} levels deep (arrays and objects)"
            if isinstance(item, dict):
                stack.extend((key, depth + 1) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return ""


def first_surrogate(value: Any) -> str:
    """The first surrogate code point in any string or key of ``value`` (parsed JSON), or ""."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return ""


def count(value: Any) -> int:
    """A token count a server reported, clamped to what the columns hold."""
    try:
        return max(0, min(int(value), MAX_COUNT))
    except (TypeError, ValueError):
        return 0
