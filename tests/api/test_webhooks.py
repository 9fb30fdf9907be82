"""Webhook delivery outcomes, in-process (the HTTP round trip is in tests/integration)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agents import webhooks
from agents.models import Run
from agents.services import submit_run
from audittrail.models import AuditEvent
from tests.support.engine import drive
from tests.support.processes import LOOPBACK_NETWORKS

pytestmark = pytest.mark.django_db


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def finished_run(make_agent, settings):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1:*"]
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = LOOPBACK_NETWORKS
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


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """A local webhook receiver answering 200: its port, and the headers of what it got."""
    received: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def named_run(make_agent, port: int) -> Run:
    agent = make_agent(script=[{"text": "done"}])
    url = f"http://hooks.test:{port}/hook"
    return drive(submit_run(agent=agent, input="hi", webhook_url=url).pk)


def test_delivery_connects_to_the_checked_address_and_sends_the_name(
    make_agent, settings, fake_dns, receiver
):
    # "hooks.test" exists only in the test's resolver: delivery works only if it connects to
    # the address checked rather than resolving the name again.
    port, received = receiver
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.test:*"]
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = LOOPBACK_NETWORKS
    fake_dns["hooks.test"] = ["127.0.0.1"]
    run = named_run(make_agent, port)

    webhooks.deliver(str(run.pk), attempt=1, final_attempt=False)

    run.refresh_from_db()
    assert run.webhook_status == "delivered"
    assert [headers["host"] for headers in received] == [f"hooks.test:{port}"]


def test_a_name_that_resolves_to_a_private_address_at_delivery_is_never_contacted(
    make_agent, settings, fake_dns, receiver
):
    port, received = receiver
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.test:*"]
    fake_dns["hooks.test"] = ["93.184.215.14"]  # public when the run is submitted ...
    run = named_run(make_agent, port)
    fake_dns["hooks.test"] = ["127.0.0.1"]  # ... loopback when it is delivered

    webhooks.deliver(str(run.pk), attempt=1, final_attempt=False)  # no retry either

    run.refresh_from_db()
    assert run.webhook_status == "failed" and received == []
    event = AuditEvent.objects.get(run=run, action="webhook.failed")
    assert "'hooks.test' resolves to 127.0.0.1, a loopback address" in event.payload["error"]


def test_a_name_that_does_not_resolve_at_delivery_is_retried(
    make_agent, settings, fake_dns, receiver
):
    port, received = receiver
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["hooks.test:*"]
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = LOOPBACK_NETWORKS
    fake_dns["hooks.test"] = ["127.0.0.1"]
    run = named_run(make_agent, port)
    del fake_dns["hooks.test"]

    with pytest.raises(webhooks.WebhookFailed, match="'hooks.test' does not resolve"):
        webhooks.deliver(str(run.pk), attempt=1, final_attempt=False)
    run.refresh_from_db()
    assert run.webhook_status == "pending" and received == []


def test_a_port_removed_from_the_allowlist_is_never_contacted(finished_run, settings):
    settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]  # the default port only
    webhooks.deliver(str(finished_run.pk), attempt=1, final_attempt=False)
    finished_run.refresh_from_db()
    assert finished_run.webhook_status == "failed"
    event = AuditEvent.objects.get(run=finished_run, action="webhook.failed")
    assert (
        "webhook port" in event.payload["error"]
        and "not in the allowed list" in (event.payload["error"])
    )


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
