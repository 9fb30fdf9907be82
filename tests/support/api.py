"""The API tests' client and checks of the one error shape."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from rest_framework.test import APIClient

from agents.models import ApiKey


class KeyClient(APIClient):
    """An APIClient that remembers the user and API key it authenticates with."""

    user: User
    api_key: ApiKey
    plain_key: str


def assert_error(
    response: Any, status: int, code: str | None = None, *, field: str | None = None
) -> dict[str, Any]:
    """The response has ``status`` and the one error shape; returns its ``error`` object."""
    assert response.status_code == status, (response.status_code, response.content[:2000])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "fields"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["fields"], dict), error
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert field in error["fields"], error
        assert error["fields"][field] and all(isinstance(m, str) for m in error["fields"][field])
    return error


def nested(depth: int, leaf: str = "1", kind: str = "object") -> str:
    """JSON text of ``depth`` nested objects (or arrays) around ``leaf``."""
    if kind == "array":
        return "[" * depth + leaf + "]" * depth
    return '{"a": ' * depth + leaf + "}" * depth
