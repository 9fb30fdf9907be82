"""Checking a run's answer against the agent's output schema (JSON Schema)."""

from __future__ import annotations

import json
import math
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


class OutputInvalid(ValueError):
    """The answer does not match the output schema; the message lists what is wrong."""


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a usable JSON Schema, or None (for the agent's form)."""
    if schema is None:
        return None
    if not isinstance(schema, dict):
        return "an output schema is a JSON object"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message}"
    return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (Python accepts them; JSON and jsonb don't)."""
    return json.loads(text, parse_constant=_no_constant)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def check_output(schema: dict[str, Any] | None, output: Any) -> Any:
    """The answer as the run returns it: with a schema, text is parsed as JSON and the value
    must validate; without one, the answer is returned as it is."""
    if not schema:
        return output
    value = output
    if isinstance(output, str):
        text = output.strip()
        if text.startswith("```"):  # models like to fence JSON
            text = text.strip("`").removeprefix("json").strip()
        try:
            value = loads_strict(text)
        except ValueError:
            raise OutputInvalid("the answer is not JSON") from None
    if not _finite(value):
        raise OutputInvalid("the answer contains NaN or Infinity, which are not JSON")
    errors = sorted(
        Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path)
    )
    if errors:
        raise OutputInvalid(
            "; ".join(
                f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                for e in errors[:10]
            )
        )
    return value
