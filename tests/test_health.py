"""Liveness and readiness probes, against the real database and broker of `make test`."""

from __future__ import annotations

import time

import pytest

from agentsite.celery import app

UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


def test_healthz_answers_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_is_ok_when_database_and_broker_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok" and body["checks"] == {"database": "ok", "broker": "ok"}
    # Which queues no live worker consumes is said, and is no reason to be unready.
    assert isinstance(body["queues_without_consumer"], list)


@pytest.mark.django_db
def test_readyz_is_503_when_the_broker_is_unreachable(client, monkeypatch):
    # Celery prefers the CELERY_BROKER_URL environment variable (which `make test` sets) over
    # the configured value, and readyz opens a fresh connection each time.
    monkeypatch.setenv("CELERY_BROKER_URL", UNREACHABLE_BROKER)
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL", raising=False)
    assert app.conf.broker_write_url == UNREACHABLE_BROKER
    started = time.monotonic()
    response = client.get("/readyz")
    elapsed = time.monotonic() - started

    assert response.status_code == 503, response.content
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("unavailable: ")
    assert elapsed < 10  # the probe gives up quickly instead of hanging a load balancer


@pytest.mark.django_db
def test_readyz_recovers_after_the_broker_comes_back(client, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("CELERY_BROKER_URL", UNREACHABLE_BROKER)
        assert client.get("/readyz").status_code == 503
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
