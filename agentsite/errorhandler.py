"""The one DRF exception handler (REST_FRAMEWORK's EXCEPTION_HANDLER): a DomainError, DRF's
own errors, a database outage and anything unexpected, in the one error shape
(agentsite.errors). Kept apart from the error family: importing DRF's views loads the API
settings (the authentication classes), which import the family themselves."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from .errors import DomainError, ErrorCode, error_body

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying while the database is unreachable.
UNAVAILABLE_RETRY_AFTER = 2


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
    if isinstance(exc, DomainError):
        field = exc.field
        return Response(
            error_body(exc.code, str(exc), {field: [str(exc)]} if field else None),
            status=exc.status,
            headers={"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {},
        )
    if isinstance(exc, OperationalError | InterfaceError):
        # The database is unreachable (restarting, failing over): nothing was accepted, and
        # the same request (with the same Idempotency-Key) can be sent again.
        logger.warning("database unavailable in %s: %s", context.get("view"), exc)
        return Response(
            error_body(ErrorCode.UNAVAILABLE, "The service is briefly unavailable; retry shortly."),
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
            error_body(ErrorCode.SERVER_ERROR, "Internal server error."),
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
        response.data = error_body(ErrorCode.INVALID, message, fields)
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
