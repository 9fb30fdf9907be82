"""Fixtures for the REST API tests: users, API keys and authenticated clients.

Every client gets a fresh API key, so the per-key rate-limit buckets in Redis never collide
between tests (or with other test runs sharing the Redis database).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User

from agents.models import Agent
from agents.services import create_api_key
from tests.support.api import KeyClient
from tests.support.users import make_reviewer


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


@pytest.fixture
def make_reviewer_client(make_client: Callable[..., KeyClient]) -> Callable[..., KeyClient]:
    """Clients of reviewers (``make_reviewer``: staff, in the ``reviewers`` group)."""
    counter = iter(range(1, 1000))

    def build(username: str = "") -> KeyClient:
        return make_client(make_reviewer(username or f"reviewer-{next(counter)}"))

    return build


@pytest.fixture
def reviewer_client(make_reviewer_client: Callable[..., KeyClient]) -> KeyClient:
    """Rita's client: the ``reviewer`` fixture's user over the API (a reviewer's API key)."""
    return make_reviewer_client("rita")
