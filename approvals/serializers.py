"""API shapes of the review queue: the approval as a reviewer reads it, the decision they send,
and the queue's filters."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agents.api.serializers import StrictSerializer

from .models import Approval, Decision

DECISIONS = tuple(d.value for d in Decision)
PRIORITY_NAMES = {label: value for value, label in Approval.Priority.choices}
ALL_STATUSES = "all"


def edit_field(approval: Approval) -> str:
    """What an ``edit`` decision carries: the tool call's ``arguments`` for a held call, else
    the ``output`` (the run's answer, or the reply the model asked a human for)."""
    if approval.reason == Approval.Reason.TOOL_REQUIRES_APPROVAL:
        return "arguments"
    return "output"


# --- output ----------------------------------------------------------------------------------


class ApprovalRunSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    link = serializers.CharField(
        help_text="The run in the runs API (which answers only the run's owner)."
    )


class ContextStepSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    kind = serializers.CharField()
    status = serializers.CharField()
    tool = serializers.CharField(allow_blank=True)
    arguments = serializers.JSONField(allow_null=True)
    text = serializers.CharField(allow_null=True, help_text="Clipped to 2000 characters.")
    error = serializers.CharField(allow_blank=True)


class ApprovalContextSerializer(serializers.Serializer):
    input = serializers.JSONField(help_text="The run's input.")
    submitted_by = serializers.CharField(allow_blank=True)
    steps = ContextStepSerializer(many=True, help_text="The run's last steps, oldest first.")


class ApprovalLinksSerializer(serializers.Serializer):
    self = serializers.CharField()
    decision = serializers.CharField()


class ApprovalSerializer(serializers.ModelSerializer):
    """One escalation as a reviewer reads it: why, what was proposed, the context, and the
    decision once taken."""

    priority = serializers.ChoiceField(source="get_priority_display", choices=list(PRIORITY_NAMES))
    overdue = serializers.BooleanField(source="is_overdue")
    run = serializers.SerializerMethodField()
    agent = serializers.CharField(source="run.agent.slug")
    tool = serializers.CharField(source="tool_name", help_text="Empty unless about a tool call.")
    edit_with = serializers.SerializerMethodField()
    proposed_arguments = serializers.SerializerMethodField()
    proposed_output = serializers.SerializerMethodField()
    context = serializers.SerializerMethodField()
    decided_by = serializers.SerializerMethodField()
    approved_arguments = serializers.JSONField(allow_null=True)
    approved_output = serializers.JSONField(allow_null=True)
    links = serializers.SerializerMethodField()

    class Meta:
        model = Approval
        fields = [
            "id",
            "status",
            "reason",
            "detail",
            "priority",
            "due_at",
            "overdue",
            "created_at",
            "run",
            "agent",
            "step_index",
            "tool",
            "edit_with",
            "proposed_arguments",
            "proposed_output",
            "context",
            "decided_by",
            "decided_at",
            "comment",
            "approved_arguments",
            "approved_output",
            "links",
        ]
        read_only_fields = fields

    @extend_schema_field(ApprovalRunSerializer)
    def get_run(self, approval: Approval) -> dict[str, Any]:
        return {
            "id": str(approval.run_id),
            "status": approval.run.status,
            "link": f"/api/v1/runs/{approval.run_id}/",
        }

    @extend_schema_field(
        serializers.ChoiceField(
            choices=["arguments", "output"],
            help_text="What an edit decision sends: the tool call's arguments, or the output.",
        )
    )
    def get_edit_with(self, approval: Approval) -> str:
        return edit_field(approval)

    @extend_schema_field(
        serializers.DictField(
            allow_null=True, help_text="The tool call held for review; null for other reasons."
        )
    )
    def get_proposed_arguments(self, approval: Approval) -> dict[str, Any] | None:
        return approval.proposed_arguments if approval.is_about_a_tool_call else None

    @extend_schema_field(
        serializers.JSONField(
            allow_null=True, help_text="The answer held for review; null for a tool call."
        )
    )
    def get_proposed_output(self, approval: Approval) -> Any:
        return None if approval.is_about_a_tool_call else approval.proposed_output

    @extend_schema_field(ApprovalContextSerializer)
    def get_context(self, approval: Approval) -> dict[str, Any]:
        context = approval.context if isinstance(approval.context, dict) else {}
        steps = context.get("steps")
        return {
            "input": context.get("input", approval.run.input),
            "submitted_by": str(context.get("submitted_by") or ""),
            "steps": [
                {
                    "index": step.get("index"),
                    "kind": step.get("kind") or "",
                    "status": step.get("status") or "",
                    "tool": step.get("tool") or "",
                    "arguments": step.get("arguments"),
                    "text": step.get("text"),
                    "error": step.get("error") or "",
                }
                for step in (steps if isinstance(steps, list) else [])
                if isinstance(step, dict)
            ],
        }

    @extend_schema_field(serializers.CharField(allow_null=True, help_text="A username."))
    def get_decided_by(self, approval: Approval) -> str | None:
        return approval.decided_by.get_username() if approval.decided_by else None

    @extend_schema_field(ApprovalLinksSerializer)
    def get_links(self, approval: Approval) -> dict[str, str]:
        base = f"/api/v1/approvals/{approval.pk}/"
        return {"self": base, "decision": base + "decision/"}


# --- input -----------------------------------------------------------------------------------


class DecisionSerializer(StrictSerializer):
    """A reviewer's decision: approve, edit (then approve) with ``arguments`` or ``output`` (see
    the approval's ``edit_with``), or reject with a ``comment``."""

    # The approval being decided is passed in the serializer's context as ``approval``.

    decision = serializers.ChoiceField(choices=DECISIONS)
    arguments = serializers.DictField(
        required=False,
        help_text="With edit, for a held tool call: the arguments to run instead.",
    )
    output = serializers.JSONField(
        required=False,
        help_text="With edit, for any other reason: the answer to return, or the reply to give "
        "the model that asked for a human.",
    )
    comment = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=5000,
        trim_whitespace=True,
        help_text="Why; required to reject.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        approval = self.context.get("approval")
        errors: dict[str, list[str]] = {}
        for name in ("arguments", "output"):
            if name not in attrs:
                continue
            if attrs["decision"] != Decision.EDIT:
                errors[name] = ["Only sent with the decision edit."]
            elif approval is not None and edit_field(approval) != name:
                errors[name] = [
                    f"This escalation is edited with {edit_field(approval)}, not {name}."
                ]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


class ApprovalFilterSerializer(StrictSerializer):
    format = serializers.CharField(required=False)  # DRF's ?format= (the browsable API's links)
    status = serializers.ChoiceField(
        choices=[*Approval.Status.values, ALL_STATUSES], default=Approval.Status.PENDING
    )
    agent = serializers.SlugField(required=False)
    reason = serializers.ChoiceField(choices=Approval.Reason.values, required=False)
    priority = serializers.ChoiceField(choices=list(PRIORITY_NAMES), required=False)
    overdue = serializers.BooleanField(required=False)
    limit = serializers.IntegerField(required=False, min_value=1)
    offset = serializers.IntegerField(required=False, min_value=0)
