"""Request size limit, enforced before any view or parser reads the body; request tracing and
metrics."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from opentelemetry.trace import SpanKind

from . import metrics, tracing
from .errors import ErrorCode, error_body


def _too_large(limit: int) -> JsonResponse:
    return JsonResponse(
        error_body(ErrorCode.REQUEST_TOO_LARGE, f"The request body is larger than {limit} bytes."),
        status=413,
    )


class RequestSizeLimitMiddleware:
    """Answer 413 to bodies over ``AGENTSITE_MAX_REQUEST_BYTES``.

    DRF's parsers read the raw stream and would skip Django's DATA_UPLOAD_MAX_MEMORY_SIZE, so the
    declared length is checked here, and a body without one (chunked) is read through Django's
    own bounded ``request.body`` before any view sees it.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = settings.AGENTSITE_MAX_REQUEST_BYTES
        if request.method in ("POST", "PUT", "PATCH"):
            declared = request.META.get("CONTENT_LENGTH") or ""
            try:
                length = int(declared) if declared else None
            except ValueError:
                return JsonResponse(
                    error_body(ErrorCode.BAD_REQUEST, "Content-Length is not a number."), status=400
                )
            if length is not None and length > limit:
                return _too_large(limit)
            if length is None:
                try:
                    body = request.body
                except RequestDataTooBig:
                    return _too_large(limit)
                if len(body) > limit:
                    return _too_large(limit)
                # DRF reads a body only when CONTENT_LENGTH says there is one.
                request.META["CONTENT_LENGTH"] = str(len(body))
        return self.get_response(request)


request_log = logging.getLogger("agentsite.request")


def route_label(route: str) -> str:
    """A URL pattern as a label: ``/api/v1/runs/{pk}/`` for ``api/v1/runs/(?P<pk>...)/$`` and
    for ``api/v1/runs/<uuid:pk>/`` alike (a pattern, never a path: bounded)."""
    route = _REGEX_GROUP.sub(r"{\1}", route)
    route = _CONVERTER.sub(r"{\1}", route)
    return "/" + route.replace("^", "").replace("$", "")


_REGEX_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)")
_CONVERTER = re.compile(r"<(?:\w+:)?(\w+)>")

# Probes and scrapes: counted, but not traced (a span every few seconds per prober is noise).
_UNTRACED = ("/metrics", "/healthz", "/readyz")


class ObservabilityMiddleware:
    """Outermost: a server span for the request (continuing the client's ``traceparent``), its
    trace id in the ``X-Trace-Id`` response header, and the request counted and timed by URL
    pattern (agentsite.metrics). Serves WSGI and ASGI alike."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        started = time.perf_counter()
        with self._span(request) as span:
            response = self.get_response(request)
            self._finish(request, response, span, started)
        return response

    async def __acall__(self, request: HttpRequest) -> Any:
        started = time.perf_counter()
        with self._span(request) as span:
            response = await self.get_response(request)
            self._finish(request, response, span, started)
        return response

    def _span(self, request: HttpRequest) -> Any:
        if request.path in _UNTRACED:
            return nullcontext(None)
        return tracing.span(
            request.method or "HTTP",
            kind=SpanKind.SERVER,
            parent=tracing.incoming(request.headers),
            attributes={"http.request.method": request.method, "url.path": request.path},
        )

    def _finish(self, request: HttpRequest, response: Any, span: Any, started: float) -> None:
        match = getattr(request, "resolver_match", None)
        route = metrics.bounded("route", route_label(match.route) if match else "unmatched")
        method = metrics.method_label(request.method)
        status = response.status_code
        seconds = time.perf_counter() - started
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_DURATION.labels(method, route).observe(seconds)
        # The access log, within the request's span (so with its trace id); the path without
        # its query string. Probes and scrapes only at DEBUG.
        request_log.log(
            logging.DEBUG if span is None else logging.INFO,
            "%s %s %s %.0f ms",
            request.method,
            request.path,
            status,
            seconds * 1000,
            extra={
                "data": {
                    "method": request.method,
                    "path": request.path,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                }
            },
        )
        if span is None:
            return
        trace_id, _ = tracing.current_ids()
        if trace_id:
            response["X-Trace-Id"] = trace_id
        if span.is_recording():
            span.update_name(f"{request.method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(tracing.Status(tracing.StatusCode.ERROR))
