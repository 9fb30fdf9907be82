"""Redaction of personal data and secrets in the audit trail and the logs (agentsite/redaction.py).

The negative cases matter as much as the positive ones: an audit trail whose ids, dates and
counts are blanked out can no longer be followed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from agents import apikeys
from agentsite.redaction import FAILED, RedactingFilter, redact
from audittrail import writer as audit
from audittrail.models import AuditEvent

# --- E-mail -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("write to alice@example.com today", "write to [email] today"),
        ("Alice.Smith+tag@mail.example.co.uk", "[email]"),
        ("<bob_99@example.org>, carol@example.net.", "<[email]>, [email]."),
    ],
)
def test_email_addresses_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    ["agentsite@localhost", "requests@2.31.0", "@alice said hi", "a @ b.com", "x@y"],
)
def test_things_with_an_at_sign_that_are_not_addresses_are_kept(text: str) -> None:
    assert redact(text) == text


# --- Phone numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("call +14155552671 now", "call [phone] now"),
        ("+44 20 7946 0958", "[phone]"),
        ("+1 (415) 555-2671", "[phone]"),
        ("+44 (0)20 7946 0958.", "[phone]."),
        ("tel:+33 1 23 45 67 89", "tel:[phone]"),
        ("(415) 555-2671", "[phone]"),
        ("415-555-2671", "[phone]"),
        ("415.555.2671", "[phone]"),
        ("1-800-555-0199", "[phone]"),
        ("020 7946 0958", "[phone]"),
        ("06 12 34 56 78", "[phone]"),
        ("01.23.45.67.89", "[phone]"),
        ("030-12345678", "[phone]"),
        ("07700 900123", "[phone]"),
        ("Phone:415-555-2671, fax 415-555-2672", "Phone:[phone], fax [phone]"),
    ],
)
def test_phone_numbers_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "123e4567-e89b-12d3-a456-426614174000",  # UUIDs, including all-digit ones
        "12345678-1234-5678-1234-567812345678",
        "deadbeef-0123-4567-8901-abcdefabcdef",
        "4bf92f3577b34da6a3ce929d0e0e4736",  # a trace id
        "2026-11-23T10:00:00Z",
        "2026-11-23 10:00:00",
        "2026-11-23T10:00:00.123456+01:00",
        "02-03-2026 10:30",
        "1763892000",  # epoch seconds
        "processed 123456789 rows",  # counts
        "1 234 567 890 tokens",
        "555-2671",  # too short
        "version 2024.10.15",
        "10.15.7",
        "192.168.100.200",
        "3.14159265358979",
        "latency 0.123456789 s",
        "+01:00",
        "SSN 123-45-6789",  # not a phone (a custom pattern can take it, see below)
    ],
)
def test_numbers_that_are_not_phone_numbers_are_kept(text: str) -> None:
    assert redact(text) == text


# --- Cards ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("card 4111111111111111 ok", "card [card] ok"),
        ("4111 1111 1111 1111", "[card]"),
        ("4111-1111-1111-1111", "[card]"),
        ("5555555555554444", "[card]"),
        ("3782 822463 10005", "[card]"),  # Amex 4-6-5
        ("6011111111111117", "[card]"),
        ("card:4012888888881881.", "card:[card]."),
    ],
)
def test_luhn_valid_card_numbers_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # fails the Luhn check
        "4111 1111 1111 1112",
        "1763892000123",  # epoch milliseconds (Luhn-valid, but no card range starts with 1)
        "1234567890123452",
        "41111111111111111111",  # 20 digits
        "4111 1111-1111 1111",  # mixed separators
        "price 4111111111111111.5",
        "v4111111111111111",
        "id-4111111111111111",
    ],
)
def test_digit_runs_that_are_not_card_numbers_are_kept(text: str) -> None:
    assert redact(text) == text


# --- Secrets ----------------------------------------------------------------------------------


def test_bearer_tokens_are_redacted_keeping_the_scheme() -> None:
    assert (
        redact("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc-_123")
        == "Authorization: Bearer [secret]"
    )
    assert redact("bearer  abcdefgh12") == "bearer  [secret]"


@pytest.mark.parametrize(
    "text",
    [
        "sk-proj-Abc123def456ghi789jkl",
        "sk-ant-api03-abcdefghijklmnopqrstuvwx",
        "sk_live_51HabcdefghijklmnopQRS",
        "rk_test_abcdefghijklmnop1234",
    ],
)
def test_provider_keys_are_redacted(text: str) -> None:
    assert redact(f"using {text} here") == "using [secret] here"


def test_this_projects_api_keys_are_redacted() -> None:
    plain, prefix = apikeys.generate()
    assert redact(f"key={plain};") == "key=[secret];"
    assert redact(f"Bearer {plain}") == "Bearer [secret]"
    # The prefix alone only names the key.
    assert redact(f"key {prefix}") == f"key {prefix}"


@pytest.mark.parametrize(
    "text",
    [
        "desk-abcdefghijklmnopqrstuvwx",
        "task_0123456789ab_" + "A" * 43,
        "sk-short",
        "the bearer of bad news",
    ],
)
def test_words_resembling_secrets_are_kept(text: str) -> None:
    assert redact(text) == text


def test_values_under_secret_keys_are_hidden_whole() -> None:
    payload = {
        "api_key": "anything",
        "apiKey": 12345,
        "X-Api-Key": ["a", "b"],
        "PASSWORD": {"nested": "x"},
        "client_secret": "s",
        "accessToken": "t",
        "Authorization": "Basic dXNlcjpwYXNz",
        "token": None,  # nothing to hide
        "secret": "",
        # Counts and names that merely contain a secret word are kept.
        "input_tokens": 12,
        "max_tokens": 100,
        "token_count": 3,
        "secret_name": "prod-db",
        "password_changed": True,
    }
    assert redact(payload) == {
        "api_key": "[secret]",
        "apiKey": "[secret]",
        "X-Api-Key": "[secret]",
        "PASSWORD": "[secret]",
        "client_secret": "[secret]",
        "accessToken": "[secret]",
        "Authorization": "[secret]",
        "token": None,
        "secret": "",
        "input_tokens": 12,
        "max_tokens": 100,
        "token_count": 3,
        "secret_name": "prod-db",
        "password_changed": True,
    }


# --- Structures -------------------------------------------------------------------------------


def test_nested_structures_are_copied_with_strings_redacted() -> None:
    payload: dict[Any, Any] = {
        "to": ["alice@example.com", {"phone": "+44 20 7946 0958"}],
        "pair": ("4111111111111111", 4111111111111111),
        "alice@example.com": 1.5,  # keys are left alone
        7: None,
        "flags": [True, False, None],
    }
    result = redact(payload)
    assert result == {
        "to": ["[email]", {"phone": "[phone]"}],
        "pair": ("[card]", 4111111111111111),  # numbers are not text
        "alice@example.com": 1.5,
        7: None,
        "flags": [True, False, None],
    }
    assert isinstance(result["pair"], tuple)
    assert payload["to"][0] == "alice@example.com"  # the original is untouched


def test_a_typical_audit_payload_is_kept_as_it_is() -> None:
    payload = {
        "kind": "model",
        "model": "openai:gpt-4o-mini-2024-07-18",
        "tool_calls": ["call_8f14e45fceea167a5a36dedd4bea2543"],
        "input_tokens": 12,
        "latency_ms": 40,
        "digest": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "due_at": "2026-11-23T10:00:00.123456+00:00",
        "approval": "0f8fad5b-d9cb-469f-a165-708677289501",
        "api_key_prefix": "3fa9c0d2e1b4",
        "error": "HTTP 429 from provider, retry in 1.5 s (attempt 2 of 4)",
    }
    assert redact(payload) == payload


def test_redaction_never_raises() -> None:
    cyclic: dict[str, Any] = {"to": "alice@example.com"}
    cyclic["self"] = cyclic
    assert redact(cyclic) == {"redaction": FAILED}
    loop: list[Any] = []
    loop.append(loop)
    assert redact(loop) == FAILED


# --- Settings ---------------------------------------------------------------------------------


def test_custom_patterns_are_applied() -> None:
    with override_settings(
        AGENTSITE_REDACT_PATTERNS={"ssn": r"\b\d{3}-\d{2}-\d{4}\b", "order": r"ORD-\d+"}
    ):
        assert redact({"note": "SSN 123-45-6789, ORD-991, a@b.io"}) == {
            "note": "SSN [ssn], [order], [email]"
        }
    # The compiled detectors follow the settings back.
    assert redact("SSN 123-45-6789") == "SSN 123-45-6789"


def test_a_bad_pattern_is_refused_naming_it() -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:  # noqa: SIM117
        with override_settings(AGENTSITE_REDACT_PATTERNS={"ok": "x", "broken": "(ab"}):
            pass
    message = str(excinfo.value)
    assert "AGENTSITE_REDACT_PATTERNS" in message and "'broken'" in message and "(ab" in message
    assert redact("a@b.io") == "[email]"  # the previous settings still apply


def test_kinds_select_the_detectors() -> None:
    text = "alice@example.com +44 20 7946 0958 4111111111111111 sk-abcdefghijklmnopqrstuv"
    with override_settings(AGENTSITE_REDACT_KINDS=["email", "card"]):
        assert redact(text) == "[email] +44 20 7946 0958 [card] sk-abcdefghijklmnopqrstuv"
        assert redact({"password": "x"}) == {"password": "x"}
    with pytest.raises(ImproperlyConfigured, match="emial"):  # noqa: SIM117
        with override_settings(AGENTSITE_REDACT_KINDS=["emial"]):
            pass


def test_redaction_can_be_switched_off() -> None:
    with override_settings(AGENTSITE_REDACT=False):
        assert redact({"to": "alice@example.com"}) == {"to": "alice@example.com"}
    assert redact({"to": "alice@example.com"}) == {"to": "[email]"}


def _import_settings(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import agentsite.settings as s; print(s.AGENTSITE_REDACT_PATTERNS)",
        ],
        env={**os.environ, "DEBUG": "1", **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    "value, expected",
    [
        ('{"ssn": "\\\\b\\\\d{3}-\\\\d{2}-\\\\d{4}\\\\b", "broken": "[a-"}', "'broken'"),
        ('["\\\\d+"]', "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_start_up_fails_on_a_bad_pattern_setting(value: str, expected: str) -> None:
    result = _import_settings(AGENTSITE_REDACT_PATTERNS=value)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "AGENTSITE_REDACT_PATTERNS" in result.stderr and expected in result.stderr


def test_patterns_are_read_from_the_environment() -> None:
    result = _import_settings(AGENTSITE_REDACT_PATTERNS='{"ssn": "\\\\d{3}-\\\\d{2}-\\\\d{4}"}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == r"{'ssn': '\\d{3}-\\d{2}-\\d{4}'}"


# --- Logging ----------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def agents_log() -> Any:
    handler = _Collect()
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("agents")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_the_logging_filter_redacts_the_formatted_message(agents_log: _Collect) -> None:
    logger = logging.getLogger("agents.engine")
    logger.warning(
        "mail to %s failed (%d tries), card %s", "bob@example.com", 3, "4111111111111111"
    )
    logger.warning("plain %s message", "trace 4bf92f3577b34da6a3ce929d0e0e4736")
    assert agents_log.lines == [
        "WARNING mail to [email] failed (3 tries), card [card]",
        "WARNING plain trace 4bf92f3577b34da6a3ce929d0e0e4736 message",
    ]


def test_the_logging_filter_leaves_the_traceback_alone(agents_log: _Collect) -> None:
    try:
        raise ValueError("boom for carol@example.com")
    except ValueError:
        logging.getLogger("agents.engine").exception("failed for %s", "carol@example.com")
    line = agents_log.lines[0]
    assert line.startswith("ERROR failed for [email]\nTraceback")
    assert "ValueError: boom for carol@example.com" in line


@pytest.mark.parametrize("kind", ["json", "text"])
def test_the_projects_formatters_redact_the_traceback(kind: str) -> None:
    from agentsite.logs import formatter

    try:
        raise ValueError("boom for carol@example.com with sk-live-0123456789abcdef0123")
    except ValueError:
        record = logging.LogRecord(
            "agents.engine", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    RedactingFilter().filter(record)
    line = formatter(kind).format(record)
    assert "ValueError: boom for [email] with [secret]" in line.replace("\\n", "\n")
    assert "carol@example.com" not in line and "sk-live" not in line


def test_every_configured_handler_redacts() -> None:
    handlers = settings.LOGGING["handlers"]
    assert handlers and all("redact" in h.get("filters", []) for h in handlers.values())
    factory = settings.LOGGING["filters"]["redact"]["()"]
    assert factory == "agentsite.redaction.RedactingFilter"
    root = logging.getLogger()
    configured = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
    assert any(isinstance(f, RedactingFilter) for h in configured for f in h.filters)


def test_celery_worker_logs_are_redacted_too() -> None:
    # A worker replaces the root logger's handlers with its own (worker_hijack_root_logger).
    script = (
        "import logging, django; django.setup()\n"
        "from celery.utils.log import get_task_logger\n"
        "from agentsite.celery import app\n"
        "app.log.setup_logging_subsystem(loglevel='INFO')\n"
        "logging.getLogger('agents.engine').warning('to %s', 'alice@example.com')\n"
        "get_task_logger('agents.tasks').warning('task to %s', 'bob@example.com')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "DEBUG": "1", "DJANGO_SETTINGS_MODULE": "agentsite.settings"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "to [email]" in result.stderr and "task to [email]" in result.stderr
    assert "@example.com" not in result.stderr


# --- The audit trail --------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_audit_trail_stores_redacted_payloads() -> None:
    audit.record(
        "test.event",
        payload={
            "to": "alice@example.com",
            "detail": {"phone": "+1 (415) 555-2671", "password": "hunter2"},
            "count": 4111111111111111,
        },
    )
    with audit.batched():
        audit.record("test.batched", payload={"card": "4111 1111 1111 1111"})
    event = AuditEvent.objects.get(action="test.event")
    assert event.payload == {
        "to": "[email]",
        "detail": {"phone": "[phone]", "password": "[secret]"},
        "count": 4111111111111111,
    }
    assert AuditEvent.objects.get(action="test.batched").payload == {"card": "[card]"}
