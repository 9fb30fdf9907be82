"""The REST API: thin views over agents.services. Paths and status codes are the contract."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from agentsite.apischema import NOT_JSON, TOO_LARGE, error_response

from .. import selectors, services
from ..models import Agent, ApiKey, Run
from .serializers import (
    AgentSerializer,
    EventPageSerializer,
    EventSerializer,
    RunCreateSerializer,
    RunFilterSerializer,
    RunSerializer,
    StepSerializer,
    UsageFilterSerializer,
    UsageReportSerializer,
    WhoAmISerializer,
)

EVENTS_PAGE = 500
ERROR_RESPONSES = {
    400: error_response("Invalid request (the input at fault named in fields)"),
    401: error_response("Missing or invalid API key"),
    404: error_response("Not found (or not yours)"),
    429: error_response("Rate limited; see Retry-After"),
}
SSE_EXAMPLE = (
    "retry: 1000\n\n"
    'id: 42\nevent: run.started\ndata: {"id": 42, "type": "run.started", ...}\n\n'
    'event: end\ndata: {"run_status": "succeeded"}\n\n'
)


@extend_schema_view(
    list=extend_schema(responses={200: AgentSerializer(many=True), **ERROR_RESPONSES}),
    retrieve=extend_schema(responses={200: AgentSerializer, **ERROR_RESPONSES}),
)
class AgentViewSet(viewsets.ReadOnlyModelViewSet):
    """The agents a caller may run, with their current version and tools."""

    serializer_class = AgentSerializer
    lookup_field = "slug"
    lookup_value_regex = "[-a-zA-Z0-9_]+"

    def get_queryset(self) -> QuerySet[Agent]:
        return selectors.listed_agents()


@extend_schema_view(
    retrieve=extend_schema(responses={200: RunSerializer, **ERROR_RESPONSES}),
)
class RunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Runs of the caller's own: another owner's run answers 404."""

    serializer_class = RunSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    def get_queryset(self) -> QuerySet[Run]:
        runs = selectors.runs_of(self.request.user)
        if self.action != "list":
            return runs
        filters = RunFilterSerializer(data=self.request.query_params.dict())
        filters.is_valid(raise_exception=True)
        return selectors.filter_runs(runs, filters.validated_data)

    @extend_schema(
        parameters=[
            OpenApiParameter("status", str, enum=[s.value for s in Run.Status]),
            OpenApiParameter("agent", str),
            OpenApiParameter("created_after", OpenApiTypes.DATETIME),
            OpenApiParameter("created_before", OpenApiTypes.DATETIME),
        ],
        responses={200: RunSerializer(many=True), **ERROR_RESPONSES},
    )
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(
        request=RunCreateSerializer,
        responses={
            202: RunSerializer,
            409: error_response(
                "The Idempotency-Key was used with another body (idempotency_conflict), or the "
                "session has a run in progress with on_conflict reject (session_busy)"
            ),
            413: TOO_LARGE,
            415: NOT_JSON,
            **ERROR_RESPONSES,
            429: error_response(
                "Rate limited, or the key's cap on unfinished runs is reached; see Retry-After"
            ),
        },
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="The same key and body return the same run; another body → 409.",
            )
        ],
    )
    def create(self, request: Request) -> Response:
        """Submit a run: 202 with the queued run. A worker picks it up at once."""
        incoming = RunCreateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        fields: dict[str, Any] = {
            "agent": data["agent"],
            "input": data["input"],
            "owner": request.user,
            "api_key": request.auth if isinstance(request.auth, ApiKey) else None,
            "session": data.get("session"),
            "on_conflict": data["on_conflict"],
            "metadata": data.get("metadata"),
            "webhook_url": data.get("webhook_url") or "",
            "budget": data.get("budget"),
        }
        idempotency_key = request.headers.get("Idempotency-Key", "").strip()
        if idempotency_key:
            run, created = services.submit_run_idempotently(
                idempotency_key=idempotency_key, request_digest=incoming.digest(), **fields
            )
        else:
            run, created = services.submit_run(**fields), True
        headers = {"Location": f"/api/v1/runs/{run.pk}/"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED, headers=headers)

    @extend_schema(responses={200: StepSerializer(many=True), **ERROR_RESPONSES})
    @action(detail=True, methods=["get"], pagination_class=None)
    def steps(self, request: Request, pk: str | None = None) -> Response:
        """Every step of the run, in order."""
        run = self.get_object()
        return Response(StepSerializer(selectors.run_steps(run), many=True).data)

    @extend_schema(
        request=None,
        responses={
            202: RunSerializer,
            409: error_response("The run had already finished (run_already_finished)"),
            413: TOO_LARGE,
            **ERROR_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """Cancel the run: 202 and the run, now cancelled; 409 if it had already finished."""
        run = self.get_object()
        run = services.cancel_run(run_id=run.pk, user=request.user)
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "after", int, description="Only events with a larger id (for polling)."
            )
        ],
        responses={
            (200, "application/json"): OpenApiResponse(
                EventPageSerializer,
                description="The events as JSON; with Accept: text/event-stream, a Server-Sent "
                "Events stream instead: each event as `id:` (its id), `event:` (its type) and "
                "`data:` (the event as JSON), until an `end` event after the run's final event "
                "(or `timeout`: reconnect with Last-Event-ID).",
            ),
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR,
                examples=[
                    OpenApiExample(
                        "stream",
                        value=SSE_EXAMPLE,
                        media_type="text/event-stream",
                        response_only=True,
                    )
                ],
            ),
            **ERROR_RESPONSES,
            429: error_response(
                "Rate limited, or too many event streams open for this key (too_many_streams); "
                "see Retry-After"
            ),
        },
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def events(self, request: Request, pk: str | None = None) -> Response:
        """The run's events after ``after``, as JSON. With ``Accept: text/event-stream`` the same
        URL streams them as Server-Sent Events until the run ends (see the README)."""
        run = self.get_object()
        after = parse_after(request.query_params.get("after"))
        events = list(selectors.run_events(run.pk, after)[:EVENTS_PAGE])
        return Response(
            {
                "events": EventSerializer(events, many=True).data,
                "run_status": run.status,
                "finished": run.is_final and len(events) < EVENTS_PAGE,
                "last_event_id": events[-1].id if events else after,
            }
        )


@extend_schema(
    responses={200: WhoAmISerializer, 401: ERROR_RESPONSES[401], 429: ERROR_RESPONSES[429]}
)
@api_view(["GET"])
def whoami(request: Request) -> Response:
    """Who the caller is: the user and, with an API key, the key (never its secret). A cheap way
    for a client to check its key, and the trivial endpoint the API benchmark compares with."""
    key = request.auth if isinstance(request.auth, ApiKey) else None
    return Response(
        {
            "user": request.user.get_username(),
            "key": {"prefix": key.prefix, "name": key.name} if key is not None else None,
        }
    )


@extend_schema(
    parameters=[UsageFilterSerializer],
    responses={
        200: UsageReportSerializer,
        **{code: ERROR_RESPONSES[code] for code in (400, 401, 429)},
    },
)
@api_view(["GET"])
def usage_report(request: Request) -> Response:
    """Tokens, cost and outcomes of the caller's runs, summed per agent, agent version, API key
    or model (the route that answered), optionally for runs created in [since, until)."""
    query = UsageFilterSerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    params = query.validated_data
    group_by = params.get("group_by", "agent")
    groups = selectors.usage_summary(
        Run.objects.filter(owner=request.user),
        group_by,
        since=params.get("since"),
        until=params.get("until"),
    )
    return Response(
        {
            "group_by": group_by,
            "since": params.get("since"),
            "until": params.get("until"),
            "groups": groups,
        }
    )


def parse_after(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        after = int(value)
    except (TypeError, ValueError):
        raise ValidationError({"after": ["Must be an event id (an integer)."]}) from None
    if after < 0:
        raise ValidationError({"after": ["Must not be negative."]})
    return after
