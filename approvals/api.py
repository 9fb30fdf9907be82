"""The review queue over the REST API: thin views over approvals.services.

Who may do what (the ``reviewers`` group holds both permissions):

- seeing the queue and an approval needs ``approvals.view_approval`` or the permission to
  decide (``approvals.decide_approval``); anyone else authenticated gets 403 on the list and
  404 on an approval (so ids do not leak); no or a bad key is 401, as everywhere;
- deciding needs ``approvals.decide_approval`` and, unless ``AGENTSITE_ALLOW_SELF_APPROVAL``,
  a run the reviewer did not submit (four-eyes): 403 ``forbidden`` otherwise.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, permissions, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentsite.apischema import NOT_JSON, TOO_LARGE, error_response

from . import selectors, services
from .models import Approval
from .serializers import (
    ALL_STATUSES,
    PRIORITY_NAMES,
    ApprovalFilterSerializer,
    ApprovalSerializer,
    DecisionSerializer,
)

UNAUTHENTICATED = {401: error_response("Missing or invalid API key")}
THROTTLED = {429: error_response("Rate limited; see Retry-After")}
NOT_FOUND = {404: error_response("No such approval, or the caller may not see the queue")}


def can_view(user: Any) -> bool:
    """May ``user`` see the review queue? Viewers, and whoever may decide."""
    return bool(
        user is not None
        and user.is_authenticated
        and user.is_active
        and (user.has_perm("approvals.view_approval") or services.can_decide(user))
    )


class IsReviewer(permissions.BasePermission):
    """The queue is for reviewers: others get 403 on the list and 404 on an approval."""

    message = "Only reviewers may see the review queue."

    def has_permission(self, request: Request, view: APIView) -> bool:
        if can_view(request.user):
            return True
        if not getattr(view, "detail", False):
            return False  # the queue: 403
        raise exceptions.NotFound()  # an approval: as if there were none


@extend_schema_view(
    retrieve=extend_schema(
        description="One approval, whatever its status.",
        responses={200: ApprovalSerializer, **UNAUTHENTICATED, **NOT_FOUND, **THROTTLED},
    ),
)
class ApprovalViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Escalations waiting for (or decided by) a human reviewer."""

    serializer_class = ApprovalSerializer
    permission_classes = [permissions.IsAuthenticated, IsReviewer]
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    def get_queryset(self) -> QuerySet[Approval]:
        approvals = selectors.approvals()
        if self.action != "list":
            return approvals
        filters = ApprovalFilterSerializer(data=self.request.query_params.dict())
        filters.is_valid(raise_exception=True)
        f = filters.validated_data
        return selectors.queue(
            approvals,
            status=None if f["status"] == ALL_STATUSES else f["status"],
            agent=f.get("agent"),
            reason=f.get("reason"),
            priority=PRIORITY_NAMES[f["priority"]] if "priority" in f else None,
            is_overdue=f.get("overdue"),
        )

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "status",
                str,
                enum=[*Approval.Status.values, ALL_STATUSES],
                description="Default pending; all for every status.",
            ),
            OpenApiParameter("agent", str, description="The agent's slug."),
            OpenApiParameter("reason", str, enum=Approval.Reason.values),
            OpenApiParameter("priority", str, enum=list(PRIORITY_NAMES)),
            OpenApiParameter(
                "overdue",
                OpenApiTypes.BOOL,
                description="true: only pending approvals past their due time; false: the rest.",
            ),
        ],
        responses={
            200: ApprovalSerializer(many=True),
            400: error_response("Invalid filter (error shape, the filter named in fields)"),
            **UNAUTHENTICATED,
            403: error_response("Not a reviewer"),
            **THROTTLED,
        },
    )
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """The review queue: most urgent first, then the soonest due, then the oldest."""
        return super().list(request, *args, **kwargs)

    @extend_schema(
        request=DecisionSerializer,
        responses={
            200: ApprovalSerializer,
            400: error_response(
                "Invalid decision (error shape, the input at fault named in fields)"
            ),
            **UNAUTHENTICATED,
            403: error_response("Not allowed to decide: not a reviewer, or the four-eyes rule"),
            **NOT_FOUND,
            409: error_response("Already decided (already_decided)"),
            413: TOO_LARGE,
            415: NOT_JSON,
            **THROTTLED,
        },
    )
    @action(detail=True, methods=["post"])
    def decision(self, request: Request, pk: str | None = None) -> Response:
        """Approve, edit (then approve) or reject, once: 200 with the approval as decided."""
        approval = self.get_object()
        # Who may decide is settled before the body is looked at; a refusal (DecisionError)
        # is rendered by agentsite.errors' handler.
        services.check_reviewer(request.user, approval.run)
        incoming = DecisionSerializer(data=request.data, context={"approval": approval})
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        decided = services.decide(
            approval.pk,
            decision=data["decision"],
            user=request.user,
            arguments=data.get("arguments"),
            output=data.get("output"),
            comment=data.get("comment", ""),
        )
        return Response(ApprovalSerializer(self.get_queryset().get(pk=decided.pk)).data)
