"""One error shape for every API error response::

    {"error": {"code": "invalid", "message": "...", "fields": {"input": ["..."]}}}

Services raise ``DomainError`` (one family: an ``ErrorCode``, an HTTP status and the input at
fault, if any); ``agentsite.errorhandler`` renders it, and DRF's own errors, in that shape. This
module imports no DRF view code, so any app's exceptions can import it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import status


class ErrorCode(StrEnum):
    """The ``code`` of an error response: what a client may branch on."""

    # Raised by services (DomainError subclasses).
    AGENTS_ERROR = "agents_error"
    AGENT_NOT_FOUND = "agent_not_found"
    AGENT_UNAVAILABLE = "agent_unavailable"
    INVALID_INPUT = "invalid_input"
    RUN_ALREADY_FINISHED = "run_already_finished"
    RUN_NOT_RETRYABLE = "run_not_retryable"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    SESSION_BUSY = "session_busy"
    TOO_MANY_ACTIVE_RUNS = "too_many_active_runs"
    INVALID_DECISION = "invalid_decision"
    ALREADY_DECIDED = "already_decided"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    # Written by the edges (DRF's other errors keep their own codes: method_not_allowed, ...).
    INVALID = "invalid"
    BAD_REQUEST = "bad_request"
    NOT_AUTHENTICATED = "not_authenticated"
    PERMISSION_DENIED = "permission_denied"
    THROTTLED = "throttled"
    TOO_MANY_STREAMS = "too_many_streams"
    METRICS_NOT_CONFIGURED = "metrics_not_configured"
    REQUEST_TOO_LARGE = "request_too_large"
    UNAVAILABLE = "unavailable"
    SERVER_ERROR = "server_error"


class DomainError(Exception):
    """A refusal by a service, rendered at the edge (API handler, admin message, CLI).

    Subclasses set ``code`` and ``status``; ``field`` names the input at fault (a class
    default, or per instance); ``retry_after`` (seconds) adds a Retry-After header."""

    code: ClassVar[ErrorCode]
    status: ClassVar[int] = status.HTTP_400_BAD_REQUEST
    retry_after: ClassVar[int | None] = None
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


def error_body(code: str, message: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": str(code), "message": message, "fields": fields or {}}}


def too_many_requests(code: str, message: str, wait: int) -> JsonResponse:
    """A 429 in the error shape with ``Retry-After``, for views outside DRF (DRF's Throttled
    goes through agentsite.errorhandler)."""
    return JsonResponse(error_body(code, message), status=429, headers={"Retry-After": str(wait)})


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def json_or_default(default: Any, code: str, message: str, status_code: int) -> Any:
    """Django-level handlers: JSON in the error shape under /api/, Django's page elsewhere."""

    def handler(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if _is_api(request):
            return JsonResponse(error_body(code, message), status=status_code)
        return default(request, *args, **kwargs)

    return handler
