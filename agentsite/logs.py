"""Structured logs: one JSON object per line, carrying the run, step, agent and trace.

``AGENTSITE_LOG_FORMAT`` picks ``json`` (the default with DEBUG off) or ``text`` (readable, the
default in development). Both carry the context: what ``bound`` put in place (the run, its
agent and step, the Celery task) and the current span's trace and span ids. Records pass the
redacting filter (agentsite.redaction) before they are formatted, in the web process and in
Celery's own handlers alike, and the formatters redact tracebacks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from opentelemetry import trace

from .redaction import RedactingFilter, redact

# The context fields, in the order a line shows them.
FIELDS = ("run_id", "step", "agent", "task", "task_id", "trace_id", "span_id")

_context: ContextVar[dict[str, Any] | None] = ContextVar("agentsite_log_context", default=None)
_service = {"name": ""}


def set_service(name: str) -> None:
    """Which process this is (web, worker, beat); every line says so."""
    _service["name"] = name


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Within the block (this thread, greenlet or coroutine), log lines carry ``fields``."""
    current = _context.get() or {}
    token = _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def context() -> dict[str, Any]:
    """The fields a line written now would carry."""
    fields = dict(_context.get() or {})
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = format(span.trace_id, "032x")
        fields["span_id"] = format(span.span_id, "016x")
    return fields


class ContextFilter(logging.Filter):
    """Copies the context onto the record (an ``extra`` given to the call wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in context().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if _service["name"] and not hasattr(record, "service"):
            record.service = _service["name"]
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    found = {}
    for key in FIELDS:
        value = getattr(record, key, None)
        if value not in (None, ""):
            found[key] = value
    return found


class JsonFormatter(logging.Formatter):
    """A line of JSON: ts, level, logger, message, service, the context, ``extra={"data":
    {...}}`` merged in, and the traceback as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        service = getattr(record, "service", "")
        if service:
            doc["service"] = service
        doc.update(_fields(record))
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            for key, value in data.items():
                doc.setdefault(str(key), value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return _redacted_traceback(super().formatException(ei))


class TextFormatter(logging.Formatter):
    """``time level logger message [run=... step=... trace=...]`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return _redacted_traceback(super().formatException(ei))

    def format(self, record: logging.LogRecord) -> str:
        # logging keeps a record's formatted traceback for the next handler: one formatted by
        # another handler (Django's own, in development) would be printed unredacted.
        cached, record.exc_text = record.exc_text, None
        try:
            line = super().format(record)
        finally:
            record.exc_text = cached
        fields = _fields(record)
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            fields.update({k: v for k, v in data.items() if k not in fields})
        if not fields:
            return line
        shown = " ".join(
            f"{'trace' if key == 'trace_id' else key}={value}"
            for key, value in fields.items()
            if key != "span_id"
        )
        head, newline, tail = line.partition("\n")  # a traceback goes after the context
        return f"{head} [{shown}]{newline}{tail}"


def _redacted_traceback(text: str) -> str:
    """A traceback's lines quote values (an exception's message, the arguments a frame shows):
    redacted like the message."""
    return str(redact(text))


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else TextFormatter()


def filter_celery_handlers(logger: logging.Logger) -> None:
    """A Celery worker replaces the root logger's handlers (worker_hijack_root_logger) with
    its own, which LOGGING's filters and formatter never reach: give those the context and the
    redacting filter (in that order), and the format LOGGING has (AGENTSITE_LOG_FORMAT)."""
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.filters.insert(0, ContextFilter())
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        handler.setFormatter(formatter(settings.AGENTSITE_LOG_FORMAT))
