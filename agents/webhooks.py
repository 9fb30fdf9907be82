"""Webhooks: when a run with a ``webhook_url`` ends, POST its final representation, signed.

Signature header (documented in the README)::

    Agentsite-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

keyed with ``AGENTSITE_WEBHOOK_SECRET``. Receivers recompute it over the raw body and reject old
timestamps. Only hosts and ports in ``AGENTSITE_WEBHOOK_ALLOWED_HOSTS`` are ever contacted, and
only at public addresses (``agentsite.outbound``: resolved once, checked, connected to), so a
client cannot make the server call internal addresses.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction

from agentsite import outbound
from audittrail import writer as audit
from audittrail.actions import AuditAction

from .api.serializers import RunSerializer
from .exceptions import InvalidRunInput
from .models import Run

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Agentsite-Signature"


def _check_allowed(url: str) -> None:
    """Raise InvalidRunInput unless ``url`` is http(s) to a host and port on the allowlist."""
    if not settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS:
        raise InvalidRunInput(
            "webhooks are disabled on this server (AGENTSITE_WEBHOOK_ALLOWED_HOSTS is empty)",
            field="webhook_url",
        )
    if len(url) > 1000:
        raise InvalidRunInput("webhook_url is at most 1000 characters", field="webhook_url")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidRunInput("webhook_url is not a valid URL", field="webhook_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRunInput("webhook_url must be an http(s) URL", field="webhook_url")
    try:
        where = outbound.destination(url)
    except ValueError as exc:  # e.g. a port out of range
        raise InvalidRunInput(f"webhook_url is not a valid URL: {exc}", field="webhook_url")
    if parts.username or parts.password:
        raise InvalidRunInput("webhook_url must not carry credentials", field="webhook_url")
    patterns = outbound.host_patterns(settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS, wildcard=".")
    refused = outbound.refusal_by_allowlist(where, patterns)
    if refused == "host":
        raise InvalidRunInput(
            f"webhook host {where.host!r} is not in the allowed list", field="webhook_url"
        )
    if refused == "port":
        raise InvalidRunInput(
            f"webhook port {where.port} of host {where.host!r} is not in the allowed list (a "
            "host listed without a port allows only the default port, 80 for http and 443 for "
            "https)",
            field="webhook_url",
        )


def _target(url: str) -> outbound.Target:
    """Resolve and check the webhook's host (agentsite.outbound). Raises InvalidRunInput when an
    address is not public; DestinationUnresolved when the name does not resolve."""
    try:
        return outbound.pin(url)
    except outbound.DestinationRefused as exc:
        raise InvalidRunInput(f"webhook_url refused: {exc}", field="webhook_url") from None
    except ValueError as exc:
        raise InvalidRunInput(f"webhook_url is not a valid URL: {exc}", field="webhook_url")


def check_webhook_url(url: str) -> None:
    """Raise InvalidRunInput unless ``url`` is http(s) to an allowed host and port whose name
    resolves to public addresses only. A DNS server failing for now is no reason to refuse:
    delivery resolves and checks again."""
    _check_allowed(url)
    try:
        _target(url)
    except outbound.DestinationUnresolved as exc:
        if not exc.temporary:
            raise InvalidRunInput(f"webhook_url refused: {exc}", field="webhook_url") from None


def sign(body: bytes, *, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(settings.AGENTSITE_WEBHOOK_SECRET.encode(), f"{t}.".encode() + body, "sha256")
    return f"t={t},v1={mac.hexdigest()}"


def verify(body: bytes, header: str, *, tolerance: int = 300) -> bool:
    """What a receiver does (and what the tests do): check the signature and its age."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance:
        return False
    return hmac.compare_digest(sign(body, timestamp=t), header)


class WebhookFailed(Exception):
    """A delivery attempt failed and is worth retrying."""


def deliver(run_id: str, *, attempt: int, final_attempt: bool) -> None:
    """POST the run's final representation to its webhook. Raises WebhookFailed to retry."""
    import httpx

    run = Run.objects.select_related("agent", "agent_version", "session").filter(pk=run_id).first()
    if run is None or not run.webhook_url or not run.is_final:
        return
    if run.webhook_status == "delivered":
        return  # a redelivered task: once is enough
    body = json.dumps(
        {"event": "run.finished", "run": RunSerializer(run).data},
        separators=(",", ":"),
        default=str,
    ).encode()
    error = ""
    try:
        _check_allowed(run.webhook_url)  # the allowlist may have changed since submission
        target = _target(run.webhook_url)  # and what the name resolves to
        with outbound.http_client(
            timeout=settings.AGENTSITE_WEBHOOK_TIMEOUT, follow_redirects=False
        ) as client:
            response = client.post(
                target.url,
                content=body,
                headers={
                    **target.headers,
                    "Content-Type": "application/json",
                    "User-Agent": "Agentsite-Webhook/1",
                    SIGNATURE_HEADER: sign(body),
                    "Agentsite-Delivery": f"{run.pk}:{attempt}",
                },
                extensions=target.extensions,
            )
        if not 200 <= response.status_code < 300:
            error = f"HTTP {response.status_code}"
    except InvalidRunInput as exc:
        error, final_attempt = str(exc), True
    except outbound.DestinationUnresolved as exc:  # retried, even a name that does not exist
        error = str(exc)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    status = "delivered" if not error else ("failed" if final_attempt else "pending")
    with transaction.atomic():
        Run.objects.filter(pk=run.pk).update(webhook_status=status, webhook_attempts=attempt)
        if status != "pending":
            audit.record(
                AuditAction.webhook_ended(status),
                run=run,
                payload={"attempts": attempt, **({"error": error} if error else {})},
            )
    if status == "pending":
        raise WebhookFailed(error)
    if error:
        logger.warning("webhook for run %s failed for good: %s", run.pk, error)
