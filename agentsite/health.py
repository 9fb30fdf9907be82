"""Liveness and readiness probes for load balancers and orchestrators; Prometheus metrics."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from agentsite import authfailures, heartbeats, metrics
from agentsite.celery import app
from agentsite.errors import ErrorCode, error_body


def healthz(request: HttpRequest) -> JsonResponse:
    """The process is alive and serving requests."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """The database and the broker are reachable; 503 otherwise. Also lists the project's
    queues that no live worker consumes (``queues_without_consumer``, from the workers'
    heartbeats: one read, no broadcast), which does not make the process unready: the web
    process serves whether or not workers run."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body: dict[str, object] = {"status": "ok" if ready else "unavailable", "checks": checks}
    if checks["broker"] == "ok":
        body["queues_without_consumer"] = heartbeats.queues_without_consumer()
    return JsonResponse(body, status=200 if ready else 503)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text format: this web process's metrics (its service's, in multiprocess
    mode) and the state gauges read from Postgres and Redis (agentsite.metrics). With
    AGENTSITE_METRICS_TOKEN set, only for ``Authorization: Bearer <token>``; in production
    without one, only if AGENTSITE_METRICS_PUBLIC says so."""
    token = settings.AGENTSITE_METRICS_TOKEN
    if token:
        header = request.headers.get("Authorization", "")
        # A wrong token is a failed authentication like a wrong API key: past the limit, the
        # client's tokens are not checked.
        wait = authfailures.seconds_blocked(request) if header else None
        if wait is not None:
            return authfailures.too_many(wait)
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            if header:
                authfailures.record_failure(request)
            response = JsonResponse(
                error_body(ErrorCode.NOT_AUTHENTICATED, "A metrics token is needed."), status=401
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    elif not (settings.DEBUG or settings.AGENTSITE_METRICS_PUBLIC):
        # Agents, tools, routes and the review queue are not for everyone who reaches the port.
        return JsonResponse(
            error_body(
                ErrorCode.METRICS_NOT_CONFIGURED,
                "Set AGENTSITE_METRICS_TOKEN (scrape with 'Authorization: Bearer <token>'), or "
                "AGENTSITE_METRICS_PUBLIC=1 where only the monitoring network reaches this port.",
            ),
            status=403,
        )
    body, content_type = metrics.exposition(state=True)
    return HttpResponse(body, content_type=content_type)
