"""A database outage is a 503 with Retry-After, in the error shape, not a 500."""

from __future__ import annotations

import pytest
from django.db import InterfaceError, OperationalError

from agentsite.errorhandler import api_exception_handler


@pytest.mark.parametrize(
    "exc", [OperationalError("connection refused"), InterfaceError("connection already closed")]
)
def test_an_unreachable_database_is_a_503_the_client_may_retry(exc):
    response = api_exception_handler(exc, {"view": None})

    assert response is not None
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert response.data["error"]["code"] == "unavailable"
    assert "connection" not in response.data["error"]["message"]  # no internals leaked
