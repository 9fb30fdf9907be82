"""Webhook delivery outcomes, in-process (the HTTP round trip is in tests/integration)."""

from __future__ import annotations

import socket

import pytest

from agents import webhooks
from agents.models import AuditEvent, Run
from agents.services import submit_run
from tests.conftest import drive

pytestmark = pytest.mark.django_db


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def finished_run(make_agent, settings):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.AGENTSITE_WEBHOOK_TIMEOUT = 1
    agent = make_agent(script=[{"text": "done"}])
    url = f"http://127.0.0.1:{closed_port()}/hook"
    run = drive(submit_run(agent=agent, input="hi", webhook_url=url).pk)
    assert run.status == Run.Status.SUCCEEDED and run.webhook_status == "pending"
    return run


def webhook_events(run: Run) -> list[str]:
    return list(
        AuditEvent.objects.filter(run=run, action__startswith="webhook.").values_list(
            "action", flat=True
        )
    )


def test_an_unreachable_receiver_is_retried_then_marked_failed(finished_run):
    with pytest.raises(webhooks.WebhookFailed, match="ConnectError"):
        webhooks.deliver(str(finished_run.pk), attempt=1, final_attempt=False)
    finished_run.refresh_from_db()
    assert (finished_run.webhook_status, finished_run.webhook_attempts) == ("pending", 1)
    assert webhook_events(finished_run) == []

    webhooks.deliver(str(finished_run.pk), attempt=8, final_attempt=True)  # gives up: no raise
    finished_run.refresh_from_db()
    assert (finished_run.webhook_status, finished_run.webhook_attempts) == ("failed", 8)
    assert webhook_events(finished_run) == ["webhook.failed"]


def test_a_host_removed_from_the_allowlist_is_never_contacted(finished_run, settings):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    webhooks.deliver(str(finished_run.pk), attempt=1, final_attempt=False)  # no retry either
    finished_run.refresh_from_db()
    assert finished_run.webhook_status == "failed"
    event = AuditEvent.objects.get(run=finished_run, action="webhook.failed")
    assert "not in the allowed list" in event.payload["error"]


def test_a_delivered_webhook_is_not_sent_again(finished_run):
    Run.objects.filter(pk=finished_run.pk).update(webhook_status="delivered")
    webhooks.deliver(str(finished_run.pk), attempt=2, final_attempt=False)  # would fail if sent
    finished_run.refresh_from_db()
    assert finished_run.webhook_status == "delivered" and webhook_events(finished_run) == []


def test_signatures_verify_and_reject_tampering_and_old_timestamps(settings):
    settings.AGENTSITE_WEBHOOK_SECRET = "s3cret"
    body = b'{"event":"run.finished"}'
    header = webhooks.sign(body)
    assert webhooks.verify(body, header)
    assert not webhooks.verify(body + b" ", header)
    assert not webhooks.verify(body, webhooks.sign(body, timestamp=1))  # 1970: too old
    assert not webhooks.verify(body, "v1=deadbeef")
