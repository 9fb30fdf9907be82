"""JSON from clients, parsed within limits: nesting no deeper than ``AGENTSITE_MAX_JSON_DEPTH``
arrays and objects, and valid Unicode (no lone UTF-16 surrogates, which Postgres refuses).

Python's ``json`` recurses once per level and raises RecursionError around depth 1000, so depth
is measured before parsing, by a linear scan of the brackets outside strings. ``loads`` serves
the API's parser (``JSONParser``), the admin's JSON fields and ``run_agent --json``.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from django import forms
from django.conf import settings
from django.forms.fields import InvalidJSONInput, JSONString
from rest_framework import parsers
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.settings import api_settings

from agents.jsonsafe import first_surrogate, unstorable

# A JSON string, or an unterminated one up to the end of the text: every opening quote matches,
# so a scan is linear however the quotes and backslashes fall.
_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)'
_STRINGS = re.compile(_STRING, re.DOTALL)
_TOKENS = re.compile(_STRING + r"|[\[\]{}]", re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# A surrogate escape in the text, or a surrogate decoded from the body by an odd charset.
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


class JsonInputError(ValueError):
    """Well-formed JSON that is refused: nested too deeply, or not valid Unicode. ``field`` is
    the top-level key at fault when parsing a request body's fields, else None."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def max_depth() -> int:
    return int(settings.AGENTSITE_MAX_JSON_DEPTH)


def loads(text: str, *, fields: bool = False) -> Any:
    """Parse ``text`` as JSON, refusing NaN and Infinity (ValueError, as for malformed JSON),
    nesting deeper than ``AGENTSITE_MAX_JSON_DEPTH`` and lone surrogates (JsonInputError).

    With ``fields``, ``text`` is a request body whose top-level keys are fields: the depth limit
    applies to each field's value, and an error names the field.
    """
    limit = max_depth()
    allowed = limit + 1 if fields else limit
    if _too_deep(text, allowed):
        raise JsonInputError(
            f"Nested more than {limit} levels deep (arrays and objects).",
            field=_deep_field(text, allowed) if fields else None,
        )
    value = json.loads(text, parse_constant=_no_constant)
    if _MAYBE_SURROGATE.search(text):
        _check_unicode(value, fields=fields)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_deep(text: str, allowed: int) -> bool:
    if text.count("[") + text.count("{") <= allowed:  # the usual body: nothing to scan
        return False
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > allowed


def _deep_field(text: str, allowed: int) -> str | None:
    """The top-level key under which ``text`` (an object) nests deeper than ``allowed``."""
    if not text.lstrip().startswith("{"):
        return None
    depth, key = 0, None
    for token in _TOKENS.finditer(text):
        found = token.group()
        if found[0] == '"':
            if depth == 1:  # at the top level the last string before a bracket is its key
                key = found
        elif found in "[{":
            depth += 1
            if depth > allowed:
                return _field_name(key)
        else:
            depth -= 1
    return None


def _field_name(token: str | None) -> str | None:
    if token is None:
        return None
    try:
        name = json.loads(token)
    except ValueError:
        name = token.strip('"')
    return printable(str(name))


def printable(text: str) -> str:
    """``text`` with any surrogate as a backslash escape, so an error message can show it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_unicode(value: Any, *, fields: bool) -> None:
    if fields and isinstance(value, dict):
        for key, item in value.items():
            found = first_surrogate(key) or first_surrogate(item)
            if found:
                raise JsonInputError(_surrogate_message(found), field=printable(key))
        return
    found = first_surrogate(value)
    if found:
        raise JsonInputError(_surrogate_message(found))


def _surrogate_message(char: str) -> str:
    # The words of DRF's CharField, which refuses the same in plain text fields.
    return f"Surrogate characters are not allowed: U+{ord(char):X}."


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser through ``loads``: a body nested too deeply or holding a lone
    surrogate is a 400 naming the field (``invalid``); malformed JSON stays ``parse_error``."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        encoding = parsers.get_encoding(parser_context or {})
        try:
            # The body is bounded by AGENTSITE_MAX_REQUEST_BYTES (RequestSizeLimitMiddleware).
            return loads(stream.read().decode(encoding), fields=True)
        except JsonInputError as exc:
            field = exc.field or api_settings.NON_FIELD_ERRORS_KEY
            raise ValidationError({field: [exc.message]}) from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


class JSONFormField(forms.JSONField):
    """Django's form JSONField through ``loads`` and ``unstorable``: JSON nested too deeply, or
    with a lone surrogate, NUL, NaN or Infinity, is an error on the field (Django's own field
    recursed into a 500, or let Postgres refuse the value). For the admin's JSON fields."""

    def to_python(self, value: Any) -> Any:
        if self.disabled or value in self.empty_values or not isinstance(value, str):
            return super().to_python(value)
        try:
            converted = loads(value)
        except JsonInputError as exc:
            raise forms.ValidationError(exc.message, code="invalid") from None
        except ValueError:
            raise forms.ValidationError(
                self.error_messages["invalid"], code="invalid", params={"value": value}
            ) from None
        problem = unstorable(converted)
        if problem:
            raise forms.ValidationError(f"The value {problem}.", code="invalid")
        return JSONString(converted) if isinstance(converted, str) else converted

    def bound_data(self, data: Any, initial: Any) -> Any:
        if self.disabled:
            return initial
        if data is None:
            return None
        try:
            return loads(data)
        except ValueError:  # JsonInputError too: shown back as the text that was sent
            return InvalidJSONInput(data)
