"""Server-Sent Events for a run: its steps and status changes as they happen.

``GET /api/v1/runs/{id}/events/`` with ``Accept: text/event-stream`` streams; any other Accept
gets the JSON page from the API view. The stream is an async generator: served under ASGI
(uvicorn, as the README deploys it) it holds no thread while it waits, only a coroutine. It
reads new audit events every ``AGENTSITE_EVENTS_POLL_SECONDS``, sends a comment every 15 s to
keep proxies from closing it, ends after the run's final event, and resumes from
``Last-Event-ID`` (or ``?after=``) when a client reconnects. A key (or an admin user) has at
most ``AGENTSITE_MAX_STREAMS_PER_KEY`` streams open at once, across processes (streamslots).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from agentsite import authfailures, metrics
from agentsite.errors import error_body, too_many_requests
from agentsite.ratelimit import bucket_for, seconds_to_wait

from .. import apikeys, streamslots
from ..models import ApiKey, Run
from ..selectors import run_events
from .serializers import EventSerializer
from .views import EVENTS_PAGE, RunViewSet

KEEPALIVE_SECONDS = 15.0
_json_view = RunViewSet.as_view({"get": "events"})


def _wants_stream(request: HttpRequest) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


class _Refused(Exception):
    def __init__(self, response: JsonResponse) -> None:
        self.response = response


def _unauthenticated(code: str, message: str) -> _Refused:
    return _Refused(
        JsonResponse(error_body(code, message), status=401, headers={"WWW-Authenticate": "Bearer"})
    )


async def _caller(request: HttpRequest) -> tuple[Any, ApiKey | None]:
    """(user, API key) as ApiKeyAuthentication or the admin session would find them; raises
    _Refused with the answer otherwise (and counts a bad key as a failed authentication)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if header and scheme.lower() == "bearer":
        wait = await sync_to_async(authfailures.seconds_blocked)(request)
        if wait is not None:
            raise _Refused(authfailures.too_many(wait))
        token = token.strip()
        key = await sync_to_async(apikeys.lookup)(token) if token else None
        if key is None:
            await sync_to_async(authfailures.record_failure)(request)
            raise _unauthenticated(
                "authentication_failed",
                "Invalid or revoked API key." if token else "The Authorization header has no key.",
            )
        return key.user, key
    user = await request.auser()
    if not user.is_authenticated:
        raise _unauthenticated("not_authenticated", "Authentication credentials were not provided.")
    return user, None


def _rate_limited(user: Any, api_key: ApiKey | None) -> JsonResponse | None:
    """Opening a stream counts against the caller's request rate like any API request."""
    seconds = seconds_to_wait(bucket_for(user, api_key))
    if seconds is None:
        return None
    wait = max(1, math.ceil(seconds))
    return too_many_requests(
        "throttled", f"Request was throttled. Expected available in {wait} seconds.", wait
    )


def _format(event: Any) -> str:
    data = EventSerializer(event).data
    return f"id: {event.id}\nevent: {event.action}\ndata: {json.dumps(data, default=str)}\n\n"


def _too_many_streams() -> JsonResponse:
    cap = settings.AGENTSITE_MAX_STREAMS_PER_KEY
    wait = streamslots.RETRY_AFTER_SECONDS
    return too_many_requests(
        "too_many_streams",
        f"These credentials have {cap} event streams open already, the most allowed. "
        "Close one, or poll the events as JSON.",
        wait,
    )


async def _stream(run_id: UUID, after: int | None, slot: streamslots.Slot) -> AsyncIterator[str]:
    metrics.EVENT_STREAMS.inc()
    try:
        async for chunk in _events(run_id, after):
            yield chunk
            if streamslots.renewal_due(slot):
                await sync_to_async(streamslots.renew, thread_sensitive=False)(slot)
    finally:  # ended, or the client went away (the generator is closed)
        metrics.EVENT_STREAMS.dec()
        await sync_to_async(streamslots.release, thread_sensitive=False)(slot)


async def _events(run_id: UUID, after: int | None) -> AsyncIterator[str]:
    deadline = time.monotonic() + settings.AGENTSITE_EVENTS_MAX_SECONDS
    last_sent = time.monotonic()
    yield "retry: 1000\n\n"
    while True:
        events = [e async for e in run_events(run_id, after)[:EVENTS_PAGE]]
        for event in events:
            after = event.id
            yield _format(event)
            last_sent = time.monotonic()
        if len(events) == EVENTS_PAGE:
            continue
        status = await Run.objects.filter(pk=run_id).values_list("status", flat=True).afirst()
        if status is None or status in Run.FINAL_STATUSES:
            # Events of the final transition are written in its transaction: all are read.
            tail = [e async for e in run_events(run_id, after)]
            for event in tail:
                yield _format(event)
            yield f"event: end\ndata: {json.dumps({'run_status': status})}\n\n"
            return
        if time.monotonic() > deadline:
            yield "event: timeout\ndata: {}\n\n"  # reconnect with Last-Event-ID to go on
            return
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(settings.AGENTSITE_EVENTS_POLL_SECONDS)


@csrf_exempt  # API-key clients have no CSRF cookie; DRF still checks it for session users
async def run_events_view(request: HttpRequest, pk: str) -> HttpResponseBase:
    try:
        run_id = UUID(pk)
    except ValueError:
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    if not _wants_stream(request) or request.method != "GET":
        response = await sync_to_async(_json_view)(request, pk=str(run_id))
        await sync_to_async(response.render)()
        return response
    try:
        user, api_key = await _caller(request)
    except _Refused as refused:
        return refused.response
    limited = await sync_to_async(_rate_limited)(user, api_key)
    if limited is not None:
        return limited
    if not await Run.objects.filter(pk=run_id, owner=user).aexists():
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    raw_after = request.headers.get("Last-Event-ID") or request.GET.get("after") or ""
    try:
        after = int(raw_after) if raw_after else None
    except ValueError:
        return JsonResponse(
            error_body(
                "invalid", "after: Must be an event id.", {"after": ["Must be an integer."]}
            ),
            status=400,
        )
    if after is not None and after < 0:
        return JsonResponse(
            error_body(
                "invalid", "after: Must not be negative.", {"after": ["Must not be negative."]}
            ),
            status=400,
        )
    slot = await sync_to_async(streamslots.acquire, thread_sensitive=False)(
        bucket_for(user, api_key)
    )
    if slot is None:
        return _too_many_streams()
    response = StreamingHttpResponse(_stream(run_id, after, slot), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response
