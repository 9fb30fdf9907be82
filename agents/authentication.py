"""DRF authentication by API key: ``Authorization: Bearer <key>``."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from agentsite import authfailures

from . import apikeys


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != self.keyword.lower():
            return None
        # A client over its failed-authentication limit is not even checked (a valid key too:
        # it cannot be told from a guess without checking it).
        wait = authfailures.seconds_blocked(request)
        if wait is not None:
            raise exceptions.Throttled(wait, authfailures.MESSAGE)
        token = token.strip()
        if not token:
            authfailures.record_failure(request)
            raise exceptions.AuthenticationFailed("The Authorization header has no key.")
        key = apikeys.lookup(token)
        if key is None:
            authfailures.record_failure(request)
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Documents the scheme in the OpenAPI schema (found by drf-spectacular on import)."""

    target_class = "agents.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"}
