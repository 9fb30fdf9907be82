"""Fixtures for the REST API tests: users, API keys and authenticated clients.

Every client gets a fresh API key, so the per-key rate-limit buckets in Redis never collide
between tests (or with other test runs sharing the Redis database).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from agents.models import Agent, ApiKey
from agents.services import create_api_key


class KeyClient(APIClient):
    """An APIClient that remembers the user and API key it authenticates with."""

    user: User
    api_key: ApiKey
    plain_key: str


@pytest.fixture
def make_client(db: None) -> Callable[..., KeyClient]:
    counter = iter(range(1, 10_000))

    def build(user: User | None = None, **user_fields: Any) -> KeyClient:
        if user is None:
            user = User.objects.create_user(
                username=user_fields.pop("username", None) or f"api-user-{next(counter)}",
                **user_fields,
            )
        api_key, plain = create_api_key(user=user, name="tests")
        client = KeyClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
        client.user, client.api_key, client.plain_key = user, api_key, plain
        return client

    return build


@pytest.fixture
def client_a(make_client: Callable[..., KeyClient]) -> KeyClient:
    return make_client(username="alice-api")


@pytest.fixture
def client_b(make_client: Callable[..., KeyClient]) -> KeyClient:
    return make_client(username="bob-api")


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    return make_agent(slug="helper", script=[{"text": "Hello, {input}!"}])


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
