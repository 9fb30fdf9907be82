"""Redacting personal data and secrets from what we keep: the audit trail and the logs.

Both outlive the runs they describe and are read by more people than the runs' owners, so
e-mail addresses, phone numbers, card numbers and credentials are replaced by a marker
(``[email]``, ``[phone]``, ``[card]``, ``[secret]``, or ``[<name>]`` for a pattern of your own)
before they are written. The detectors lean towards leaving text alone: ids, hashes, dates,
versions and counts are what audit payloads mostly hold, and a trail with those blanked out
loses the ability to correlate events. ``redact`` runs on every audit event, so the patterns are
compiled once and a string with no digit and no ``@`` only meets the secret patterns.

Settings (agentsite/settings.py): ``AGENTSITE_REDACT`` switches it off, ``AGENTSITE_REDACT_KINDS``
picks the built-in detectors, ``AGENTSITE_REDACT_PATTERNS`` adds named regular expressions.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

KINDS: tuple[str, ...] = ("email", "phone", "card", "secret")
HIDDEN = "[secret]"  # what a credential becomes
# What redact() returns when it fails: the audit event is still written, without the data.
FAILED = "[unredactable]"
_SETTINGS = {"AGENTSITE_REDACT", "AGENTSITE_REDACT_KINDS", "AGENTSITE_REDACT_PATTERNS"}
_NAME = re.compile(r"\w[\w.-]{0,39}", re.ASCII)

# Shared edges of the number detectors. A number must stand on its own: not glued to a word
# character (hex ids, trace ids, UUID groups like "a456-4266..."), not continuing a number or
# identifier through a separator ("6-", "3.", "v2/"), and not followed by more of one.
_NUM_START = r"(?<![\w+])(?<!\w[-./])(?<!\d[:,])"
_NUM_END = r"(?!\w|[-./:,]\w)"

_EMAIL = re.compile(
    # The look-behind anchors the local part at its start, so a long run of word characters
    # is scanned once, not once per position.
    r"(?<![\w.%+-])[\w.%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])"
)
_PHONE = re.compile(
    _NUM_START
    + r"(?:"
    # International: +<country> then digit groups split by one space, dot or dash, or by an
    # area code in brackets: +14155552671, +44 20 7946 0958, +1 (415) 555-2671, +44 (0)20 ...
    + r"\+\d{1,15}(?:(?:[ .-]| ?\(\d{1,4}\) ?)\d{1,12}){0,6}"
    # North American: (415) 555-2671, 415-555-2671, 415.555.2671, 1-800-555-0199.
    + r"|(?:1[ .-])?(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}(?P<nanp>[ .-])\d{3}(?P=nanp))\d{4}"
    # National with a trunk 0, one kind of separator: 020 7946 0958, 06 12 34 56 78,
    # 030-12345678, 01.23.45.67.89, 07700 900123.
    + r"|0\d{1,4}(?P<sep>[ .-])\d{2,8}(?:(?P=sep)\d{2,8}){0,4}"
    + r")"
    + _NUM_END
)
_CARD = re.compile(
    # The networks' ranges start with 2 to 6 (Mastercard 2-series, Amex/Diners/JCB, Visa,
    # Mastercard/Maestro, Discover/UnionPay); ids and epoch timestamps mostly start with 1.
    _NUM_START
    + r"(?:[2-6]\d{12,18}"
    + r"|[2-6]\d{3}(?P<sep>[ -])\d{4}(?P=sep)\d{4}(?P=sep)\d{4}"  # 4111 1111 1111 1111
    + r"|3\d{3}(?P<amex>[ -])\d{6}(?P=amex)\d{4,5})"  # 3782 822463 10005 (Amex, Diners)
    + _NUM_END
)
_SECRET_TEXT = re.compile(
    # Bearer tokens (the RFC 6750 token68 alphabet); the word "Bearer" is kept for context.
    r"(?P<bearer>\b(?i:bearer)\s+)[\w.~+/-]{8,}=*"
    # Provider keys: OpenAI/Anthropic style sk-..., Stripe style sk_live_/rk_test_...
    r"|(?<![\w-])sk-[\w-]{16,}"
    r"|\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"
    # This project's API keys (agents/apikeys.py): ask_<12 hex>_<token_urlsafe(32)>.
    r"|\bask_[0-9a-f]{12}_[\w-]{20,}"
)
_HAS_DIGIT = re.compile(r"\d").search
# Dict keys whose values are credentials, after camelCase and dashes become "_" and lowercase:
# the name alone or as the last part ("access_token", "x_api_key", "clientSecret"), so counts
# such as "input_tokens" or "max_tokens" are kept.
_SECRET_KEY_NAMES = (
    "api_key",
    "apikey",
    "password",
    "passwd",
    "secret",
    "secret_key",
    "private_key",
    "token",
    "authorization",
)
_SECRET_KEY_SUFFIXES = tuple("_" + name for name in _SECRET_KEY_NAMES)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def parse_kinds(kinds: Iterable[str], *, name: str = "AGENTSITE_REDACT_KINDS") -> list[str]:
    """The built-in detectors to run; an unknown one is refused, as a typo would otherwise
    silently switch a detector off."""
    chosen = [kind.strip().lower() for kind in kinds if kind.strip()]
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown:
        raise ImproperlyConfigured(
            f"{name}: unknown kind(s) {', '.join(unknown)} (known: {', '.join(KINDS)})"
        )
    return chosen


def parse_patterns(
    raw: str | dict[str, str], *, name: str = "AGENTSITE_REDACT_PATTERNS"
) -> dict[str, str]:
    """Custom patterns as given (a JSON object text from the environment, or a dict), checked:
    the process must not start, and an override not apply, with a pattern that cannot run."""
    patterns: Any = raw
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            patterns = json.loads(raw)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(patterns, dict):
        raise ImproperlyConfigured(
            f'{name} must be a JSON object of {{"name": "regex"}}, not {type(patterns).__name__}'
        )
    for label, pattern in patterns.items():
        if not isinstance(label, str) or not _NAME.fullmatch(label):
            raise ImproperlyConfigured(f"{name}: pattern name {label!r} is not a short word")
        if not isinstance(pattern, str) or not pattern:
            raise ImproperlyConfigured(f"{name}: pattern {label!r} must be a non-empty string")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ImproperlyConfigured(
                f"{name}: pattern {label!r} ({pattern!r}) is not a valid regex: {exc}"
            ) from None
    return dict(patterns)


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    number = match.group().replace(" ", "").replace("-", "")
    return "[card]" if _luhn(number) else match.group()


def _phone(match: re.Match[str]) -> str:
    digits = sum(char.isdigit() for char in match.group())
    return "[phone]" if 9 <= digits <= 15 else match.group()


def _secret(match: re.Match[str]) -> str:
    return (match.group("bearer") or "") + HIDDEN


def _hide(value: Any) -> Any:
    # None and "" stay: "no key was used" is worth keeping and reveals nothing.
    return value if value is None or value == "" else HIDDEN


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a dict key names a credential, so its whole value is hidden."""
    normal = _CAMEL.sub("_", key).lower().replace("-", "_")
    return normal in _SECRET_KEY_NAMES or normal.endswith(_SECRET_KEY_SUFFIXES)


@dataclass(frozen=True)
class _Scrubber:
    """The detectors the settings ask for, compiled, in the order they must run: secrets first
    (a key may hold digits), cards before phones (a spaced card is no phone), custom last."""

    email: bool
    phone: bool
    card: bool
    secret: bool
    custom: tuple[tuple[re.Pattern[str], str], ...]

    def text(self, value: str) -> str:
        if self.secret:
            value = _SECRET_TEXT.sub(_secret, value)
        if self.email and "@" in value:
            value = _EMAIL.sub("[email]", value)
        if (self.card or self.phone) and _HAS_DIGIT(value):
            if self.card:
                value = _CARD.sub(_card, value)
            if self.phone:
                value = _PHONE.sub(_phone, value)
        for pattern, marker in self.custom:
            value = pattern.sub(marker, value)
        return value

    def walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {
                key: _hide(item)
                if self.secret and isinstance(key, str) and is_secret_key(key)
                else self.walk(item)
                for key, item in value.items()
            }
        if isinstance(value, list):
            return [self.walk(item) for item in value]
        if isinstance(value, tuple):
            return tuple(self.walk(item) for item in value)
        return value


_scrubber: _Scrubber | None = None


def _current() -> _Scrubber | None:
    """The scrubber for the current settings (None when redaction is off), built once and
    rebuilt after a redaction setting changes (override_settings in tests)."""
    global _scrubber
    if not getattr(settings, "AGENTSITE_REDACT", True):
        return None
    if _scrubber is None:
        kinds = set(parse_kinds(getattr(settings, "AGENTSITE_REDACT_KINDS", KINDS)))
        custom = parse_patterns(getattr(settings, "AGENTSITE_REDACT_PATTERNS", {}))
        _scrubber = _Scrubber(
            email="email" in kinds,
            phone="phone" in kinds,
            card="card" in kinds,
            secret="secret" in kinds,
            custom=tuple((re.compile(regex), f"[{label}]") for label, regex in custom.items()),
        )
    return _scrubber


def _on_setting_changed(*, setting: str, enter: bool, **kwargs: Any) -> None:
    """Drop the compiled detectors when a redaction setting changes; on entering an override,
    build them at once so a bad pattern fails the override itself, as it fails start-up."""
    global _scrubber
    if setting in _SETTINGS:
        _scrubber = None
        if enter:
            _current()


setting_changed.connect(_on_setting_changed, dispatch_uid="agentsite.redaction")


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with personal data and secrets in its strings replaced by
    markers; dict keys, numbers, booleans and None are kept, and so are the values of any
    other type. Never raises: the audit event must be written even if redaction breaks (a
    cyclic or absurdly deep value), so it then gets ``FAILED`` in place of the data."""
    try:
        scrubber = _current()
        return value if scrubber is None else scrubber.walk(value)
    except Exception:
        return {"redaction": FAILED} if isinstance(value, dict) else FAILED


class RedactingFilter(logging.Filter):
    """Redacts a log record's message. The message is formatted here, once, and stored with
    the arguments cleared, since PII usually arrives in the arguments (``"sent to %s"``).
    Tracebacks are redacted by the formatters (agentsite.logs), which write them. Install it on
    handlers, so that it sees the records propagated from every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format: logging reports it itself when it formats
        record.msg = redact(message)
        record.args = ()
        data = getattr(record, "data", None)
        if isinstance(data, dict):  # the structured fields of a line (agentsite.logs)
            record.data = redact(data)
        return True
