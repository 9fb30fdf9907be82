"""OpenAPI descriptions every app's API shares: the one error shape (agentsite.errors) and the
error responses documented with it."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text="Messages by the name of the input at fault; empty if none is.",
    )


class ErrorResponseSerializer(serializers.Serializer):
    """The one error shape (see agentsite.errors)."""

    error = ErrorDetailSerializer()


def error_response(description: str) -> OpenApiResponse:
    """An error answer in the one error shape, for ``extend_schema(responses=...)``."""
    return OpenApiResponse(ErrorResponseSerializer, description=description)


TOO_LARGE = error_response("The body is larger than AGENTSITE_MAX_REQUEST_BYTES")
NOT_JSON = error_response("The body is not JSON (Content-Type)")
