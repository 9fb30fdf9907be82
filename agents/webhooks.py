"""Webhooks: when a run with a ``webhook_url`` ends, POST its final representation, signed.

Signature header (documented in the README)::

    Agentsite-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

keyed with ``AGENTSITE_WEBHOOK_SECRET``. Receivers recompute it over the raw body and reject old
timestamps. Only hosts in ``AGENTSITE_WEBHOOK_ALLOWED_HOSTS`` are ever contacted, so a client
cannot make the server call arbitrary internal addresses.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction

from .exceptions import InvalidRunInput

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Agentsite-Signature"


def host_allowed(host: str) -> bool:
    host = host.lower().rstrip(".")
    for allowed in settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS:
        allowed = allowed.lower()
        if allowed.startswith("."):
            if host.endswith(allowed) or host == allowed[1:]:
                return True
        elif host == allowed:
            return True
    return False


def check_webhook_url(url: str) -> None:
    """Raise InvalidRunInput unless ``url`` is http(s) to an allowed host."""
    if not settings.AGENTSITE_WEBHOOK_ALLOWED_HOSTS:
        raise InvalidRunInput(
            "webhooks are disabled on this server (AGENTSITE_WEBHOOK_ALLOWED_HOSTS is empty)",
            field="webhook_url",
        )
    if len(url) > 1000:
        raise InvalidRunInput("webhook_url is at most 1000 characters", field="webhook_url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRunInput("webhook_url must be an http(s) URL", field="webhook_url")
    if parts.username or parts.password:
        raise InvalidRunInput("webhook_url must not carry credentials", field="webhook_url")
    if not host_allowed(parts.hostname):
        raise InvalidRunInput(
            f"webhook host {parts.hostname!r} is not in the allowed list", field="webhook_url"
        )


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

    from . import audit
    from .models import Run
    from .serializers import RunSerializer

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
        check_webhook_url(run.webhook_url)  # the allowlist may have changed since submission
        response = httpx.post(
            run.webhook_url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "Agentsite-Webhook/1",
                SIGNATURE_HEADER: sign(body),
                "Agentsite-Delivery": f"{run.pk}:{attempt}",
            },
            timeout=settings.AGENTSITE_WEBHOOK_TIMEOUT,
            follow_redirects=False,
        )
        if not 200 <= response.status_code < 300:
            error = f"HTTP {response.status_code}"
    except InvalidRunInput as exc:
        error, final_attempt = str(exc), True
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    status = "delivered" if not error else ("failed" if final_attempt else "pending")
    with transaction.atomic():
        Run.objects.filter(pk=run.pk).update(webhook_status=status, webhook_attempts=attempt)
        if status != "pending":
            audit.record(
                f"webhook.{status}",
                run=run,
                payload={"attempts": attempt, **({"error": error} if error else {})},
            )
    if status == "pending":
        raise WebhookFailed(error)
    if error:
        logger.warning("webhook for run %s failed for good: %s", run.pk, error)
