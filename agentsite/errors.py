"""One error shape for every API error response::

    {"error": {"code": "invalid", "message": "...", "fields": {"input": ["..."]}}}

Domain exceptions raised by services are translated here, in one place.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from agents import exceptions as domain

logger = logging.getLogger(__name__)

DOMAIN_STATUS: dict[type[domain.AgentsError], int] = {
    domain.AgentNotFound: status.HTTP_400_BAD_REQUEST,
    domain.AgentUnavailable: status.HTTP_400_BAD_REQUEST,
    domain.InvalidRunInput: status.HTTP_400_BAD_REQUEST,
    domain.RunAlreadyFinished: status.HTTP_409_CONFLICT,
    domain.IdempotencyConflict: status.HTTP_409_CONFLICT,
    domain.SessionBusy: status.HTTP_409_CONFLICT,
    domain.TooManyActiveRuns: status.HTTP_429_TOO_MANY_REQUESTS,
}
DOMAIN_FIELD: dict[type[domain.AgentsError], str] = {
    domain.AgentNotFound: "agent",
    domain.AgentUnavailable: "agent",
    domain.SessionBusy: "session",
}
# Seconds a client should wait before submitting again when over its cap of unfinished runs.
ACTIVE_RUNS_RETRY_AFTER = 5
# Seconds a client should wait before retrying while the database is unreachable.
UNAVAILABLE_RETRY_AFTER = 2


def error_body(code: str, message: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


def too_many_requests(code: str, message: str, wait: int) -> JsonResponse:
    """A 429 in the error shape with ``Retry-After``, for views outside DRF (DRF's Throttled
    goes through the handler below)."""
    return JsonResponse(error_body(code, message), status=429, headers={"Retry-After": str(wait)})


def _flatten(detail: Any) -> dict[str, Any]:
    if isinstance(detail, dict):
        return {
            str(k): [str(m) for m in v] if isinstance(v, list) else _flatten(v) or [str(v)]
            for k, v in detail.items()
        }
    return {}


def _first_message(fields: dict[str, Any]) -> str:
    for name, messages in fields.items():
        if isinstance(messages, list) and messages:
            return f"{name}: {messages[0]}" if name != "non_field_errors" else str(messages[0])
        if isinstance(messages, dict):
            return f"{name}.{_first_message(messages)}"
    return "Invalid request."


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, domain.AgentsError):
        code = DOMAIN_STATUS.get(type(exc), status.HTTP_400_BAD_REQUEST)
        field = getattr(exc, "field", None) or DOMAIN_FIELD.get(type(exc))
        headers = {}
        if isinstance(exc, domain.TooManyActiveRuns):
            headers["Retry-After"] = str(ACTIVE_RUNS_RETRY_AFTER)
        return Response(
            error_body(exc.code, str(exc), {field: [str(exc)]} if field else None),
            status=code,
            headers=headers,
        )
    if isinstance(exc, OperationalError | InterfaceError):
        # The database is unreachable (restarting, failing over): nothing was accepted, and
        # the same request (with the same Idempotency-Key) can be sent again.
        logger.warning("database unavailable in %s: %s", context.get("view"), exc)
        return Response(
            error_body("unavailable", "The service is briefly unavailable; retry shortly."),
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        logger.exception("unhandled error in %s", context.get("view"), exc_info=exc)
        return Response(
            error_body("server_error", "Internal server error."),
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    if isinstance(exc, exceptions.ValidationError):
        fields = _flatten(exc.detail) if isinstance(exc.detail, dict) else {}
        message = (
            _first_message(fields)
            if fields
            else "; ".join(str(m) for m in exc.detail)
            if isinstance(exc.detail, list)
            else str(exc.detail)
        )
        response.data = error_body("invalid", message, fields)
    elif isinstance(exc, exceptions.APIException):
        code = exc.get_codes()
        response.data = error_body(
            code if isinstance(code, str) else "error", _detail_text(exc.detail)
        )
    return response


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(str(d) for d in detail)
    if isinstance(detail, dict):
        return _first_message(_flatten(detail))
    return str(detail)


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def json_or_default(default: Any, code: str, message: str, status_code: int) -> Any:
    """Django-level handlers: JSON in the error shape under /api/, Django's page elsewhere."""

    def handler(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if _is_api(request):
            return JsonResponse(error_body(code, message), status=status_code)
        return default(request, *args, **kwargs)

    return handler
