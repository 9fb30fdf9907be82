"""API shapes: input serializers validate what clients send; output serializers render rows."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from approvals import selectors as approval_selectors
from audittrail.models import AuditEvent
from tools.policy import version_grants
from tools.registry import registry

from ..models import Agent, Run, Step

MAX_METADATA_BYTES = 16 * 1024


class StrictSerializer(serializers.Serializer):
    """Unknown fields are an error, so a client cannot believe it set ``status`` or ``owner``."""

    def to_internal_value(self, data: Any) -> Any:
        unknown: dict[str, list[str]] = {}
        if isinstance(data, dict):
            unknown = {
                name: ["Unknown field; it cannot be set by a client."]
                for name in sorted(set(data) - set(self.fields))
            }
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else {}
            raise serializers.ValidationError({**detail, **unknown}) from None
        if unknown:
            raise serializers.ValidationError(unknown)
        return value


class ToolSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    parameters = serializers.DictField()
    mode = serializers.ChoiceField(
        choices=["allow", "require_approval"],
        help_text="require_approval: a call waits for a human reviewer before it runs.",
    )


class PendingApprovalSerializer(serializers.Serializer):
    """The oldest action of a run waiting for a human reviewer, and how many are waiting."""

    id = serializers.UUIDField()
    reason = serializers.CharField()
    tool = serializers.CharField(help_text="The tool whose call waits; empty for other reasons.")
    step_index = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    count = serializers.IntegerField()


class AgentSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(source="current_version.number")
    model_route = serializers.CharField(source="current_version.model_route")
    tools = serializers.SerializerMethodField()

    class Meta:
        model = Agent
        fields = ["slug", "name", "description", "version", "model_route", "tools"]

    @extend_schema_field(ToolSerializer(many=True))
    def get_tools(self, agent: Agent) -> list[dict[str, Any]]:
        granted = version_grants(agent.current_version)  # type: ignore[arg-type]
        tools = []
        for name in sorted(granted):
            spec = registry.get(name)
            if spec is not None:
                tools.append(
                    {
                        "name": spec.name,
                        "description": spec.description,
                        "parameters": spec.parameters_schema(),
                        "mode": granted[name].get("mode", "allow"),
                    }
                )
        return tools


@extend_schema_field({"oneOf": [{"type": "string", "minLength": 1}, {"type": "object"}]})
class RunInputField(serializers.JSONField):
    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            if not data.strip():
                raise serializers.ValidationError("Must not be empty.")
            return data
        if isinstance(data, dict):
            return data
        raise serializers.ValidationError("Must be a string or a JSON object.")


class RunCreateSerializer(StrictSerializer):
    agent = serializers.SlugField(max_length=80, help_text="The agent's slug.")
    input = RunInputField(help_text="Text, or a JSON object.")
    session = serializers.CharField(
        max_length=200,
        required=False,
        allow_null=True,
        help_text="Your conversation id: runs naming the same session see earlier turns.",
    )
    on_conflict = serializers.ChoiceField(
        choices=["enqueue", "reject"],
        default="enqueue",
        help_text="If the session has a run in progress: wait for it, or answer 409.",
    )
    metadata = serializers.DictField(required=False, help_text="Yours; returned as given.")
    webhook_url = serializers.URLField(
        max_length=1000,
        required=False,
        allow_blank=True,
        help_text="POSTed the run's final representation, signed (see the README).",
    )

    budget = serializers.DictField(
        required=False,
        help_text=(
            "Tighter limits for this run than the agent's: max_steps, max_tokens, "
            "max_input_tokens, max_output_tokens, max_cost (a decimal string or number), "
            "max_wall_seconds. A limit may be lowered, never raised."
        ),
    )

    def validate_metadata(self, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise serializers.ValidationError(f"At most {MAX_METADATA_BYTES} bytes of JSON.")
        return value

    def digest(self) -> str:
        """A fingerprint of the request, to tell an idempotent replay from a reuse of its key."""
        canonical = json.dumps(self.validated_data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class UsageSerializer(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cost = serializers.DecimalField(max_digits=14, decimal_places=6, coerce_to_string=True)


class BudgetSerializer(serializers.Serializer):
    """A run's limits (0: none). Crossing one stops the run before its next model call."""

    max_steps = serializers.IntegerField()
    max_tokens = serializers.IntegerField()
    max_input_tokens = serializers.IntegerField()
    max_output_tokens = serializers.IntegerField()
    max_cost = serializers.CharField(help_text="A decimal string.")
    max_wall_seconds = serializers.IntegerField()


class WebhookSerializer(serializers.Serializer):
    url = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()


class LinksSerializer(serializers.Serializer):
    self = serializers.CharField()
    steps = serializers.CharField()
    events = serializers.CharField()
    cancel = serializers.CharField()


class RunSerializer(serializers.ModelSerializer):
    agent = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    agent_version = serializers.IntegerField(source="agent_version.number", read_only=True)
    input = serializers.JSONField()
    result = serializers.JSONField(allow_null=True)
    error = serializers.SerializerMethodField()
    usage = serializers.SerializerMethodField()
    budget = serializers.SerializerMethodField()
    session = serializers.SlugRelatedField(slug_field="key", read_only=True, allow_null=True)
    webhook = serializers.SerializerMethodField()
    pending_approval = serializers.SerializerMethodField()
    links = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = [
            "id",
            "agent",
            "agent_version",
            "status",
            "input",
            "result",
            "error",
            "usage",
            "budget",
            "session",
            "metadata",
            "model_route",
            "trace_id",
            "webhook",
            "pending_approval",
            "created_at",
            "started_at",
            "finished_at",
            "links",
        ]
        read_only_fields = fields

    @extend_schema_field(ErrorSerializer(allow_null=True))
    def get_error(self, run: Run) -> dict[str, str] | None:
        if not run.error and not run.error_code:
            return None
        return {"code": run.error_code, "message": run.error}

    @extend_schema_field(UsageSerializer)
    def get_usage(self, run: Run) -> dict[str, Any]:
        return {
            "input_tokens": run.input_tokens,
            "output_tokens": run.output_tokens,
            "cost": f"{run.cost:.6f}",
        }

    @extend_schema_field(BudgetSerializer)
    def get_budget(self, run: Run) -> dict[str, Any]:
        return {**run.agent_version.budget(), **(run.budget or {})}

    @extend_schema_field(WebhookSerializer(allow_null=True))
    def get_webhook(self, run: Run) -> dict[str, Any] | None:
        if not run.webhook_url:
            return None
        return {
            "url": run.webhook_url,
            "status": run.webhook_status or "pending",
            "attempts": run.webhook_attempts,
        }

    @extend_schema_field(PendingApprovalSerializer(allow_null=True))
    def get_pending_approval(self, run: Run) -> dict[str, Any] | None:
        if run.status != Run.Status.WAITING_APPROVAL:
            return None
        pending = approval_selectors.pending_for_run(run, limit=50)
        if not pending:
            return None
        first = pending[0]
        return {
            "id": str(first.pk),
            "reason": first.reason,
            "tool": first.tool_name,
            "step_index": first.step_index,
            "created_at": first.created_at,
            "count": len(pending),
        }

    @extend_schema_field(LinksSerializer)
    def get_links(self, run: Run) -> dict[str, str]:
        base = f"/api/v1/runs/{run.pk}/"
        return {
            "self": base,
            "steps": base + "steps/",
            "events": base + "events/",
            "cancel": base + "cancel/",
        }


class StepSerializer(serializers.ModelSerializer):
    arguments = serializers.SerializerMethodField()
    output = serializers.SerializerMethodField()

    class Meta:
        model = Step
        fields = [
            "index",
            "kind",
            "status",
            "attempts",
            "parent_index",
            "model_route",
            "tool_name",
            "tool_call_id",
            "arguments",
            "output",
            "error",
            "latency_ms",
            "input_tokens",
            "output_tokens",
            "cost",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.ANY)
    def get_arguments(self, step: Step) -> Any:
        return step.request.get("arguments") if step.kind == Step.Kind.TOOL else None

    @extend_schema_field(OpenApiTypes.ANY)
    def get_output(self, step: Step) -> Any:
        return step.response


class EventSerializer(serializers.ModelSerializer):
    type = serializers.CharField(source="action")
    step = serializers.IntegerField(source="step_index", allow_null=True)
    data = serializers.JSONField(source="payload")

    class Meta:
        model = AuditEvent
        fields = ["id", "type", "created_at", "step", "data"]
        read_only_fields = fields


class EventPageSerializer(serializers.Serializer):
    events = EventSerializer(many=True)
    run_status = serializers.CharField()
    finished = serializers.BooleanField()
    last_event_id = serializers.IntegerField(allow_null=True)


class ApiKeyInfoSerializer(serializers.Serializer):
    prefix = serializers.CharField()
    name = serializers.CharField()


class WhoAmISerializer(serializers.Serializer):
    user = serializers.CharField()
    key = ApiKeyInfoSerializer(allow_null=True)


class RunFilterSerializer(StrictSerializer):
    format = serializers.CharField(required=False)  # DRF's ?format= (the browsable API's links)
    status = serializers.ChoiceField(choices=Run.Status.choices, required=False)
    agent = serializers.SlugField(required=False)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)
    limit = serializers.IntegerField(required=False, min_value=1)
    offset = serializers.IntegerField(required=False, min_value=0)


class UsageFilterSerializer(StrictSerializer):
    format = serializers.CharField(required=False)
    group_by = serializers.ChoiceField(
        choices=["agent", "version", "api_key", "model"], required=False, default="agent"
    )
    since = serializers.DateTimeField(required=False, help_text="Runs created at or after.")
    until = serializers.DateTimeField(required=False, help_text="Runs created before.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and until <= since:
            raise serializers.ValidationError({"until": "Must be after since."})
        return attrs


class UsageReportSerializer(serializers.Serializer):
    group_by = serializers.CharField()
    since = serializers.DateTimeField(allow_null=True)
    until = serializers.DateTimeField(allow_null=True)
    groups = serializers.ListField(
        child=serializers.DictField(),
        help_text=(
            "Per group: its key (agent; agent and version; api_key and api_key_name; or "
            "model), runs, succeeded, failed, cancelled, success_rate, input_tokens, "
            "output_tokens, cost, cost_per_run (model: runs, calls, failed_calls, tokens, cost)."
        ),
    )
