"""Request size limit, enforced before any view or parser reads the body."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse

from .errors import error_body


def _too_large(limit: int) -> JsonResponse:
    return JsonResponse(
        error_body("request_too_large", f"The request body is larger than {limit} bytes."),
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
                    error_body("bad_request", "Content-Length is not a number."), status=400
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
