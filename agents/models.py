"""Agents, their immutable versions, runs, steps, sessions, providers and the audit trail."""

from __future__ import annotations

import hashlib
import json
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from .outputs import schema_problem

ROUTE_VALIDATOR = RegexValidator(
    r"^[a-z0-9][a-z0-9_-]*:[^\s]+$",
    "A model route is 'provider:model', e.g. 'scripted:demo' or 'local:llama-3.1-8b'.",
)


def new_trace_id() -> str:
    return uuid.uuid4().hex


def routes_problem(routes: Any) -> str:
    """What is wrong with a list of fallback routes (for its form), or ""."""
    if not isinstance(routes, list):
        return 'A list of routes, e.g. ["local:llama-3.1-8b"].'
    for route in routes:
        try:
            ROUTE_VALIDATOR(route if isinstance(route, str) else "")
        except ValidationError:
            return f"{route!r} is not a route: use 'provider:model'."
    if len(set(routes)) != len(routes):
        return "A route is listed twice."
    return ""


class RoutineSteps(models.TextChoices):
    """Which model turns the agent's routine route (a cheaper model) may answer."""

    NONE = "", "none: every turn uses the primary route"
    AFTER_TOOLS = "after_tools", "turns that read tool results"


POLICY_CHOICES = {
    "on_budget_exhausted": ("fail", "escalate"),
    "on_expiry": ("reject", "escalate"),
}
PRIORITY_NAMES = ("low", "normal", "high", "urgent")


def escalation_policy_problem(policy: dict[str, Any]) -> str:
    """What is wrong with an agent's escalation policy (for its form), or ""."""
    known = {*POLICY_CHOICES, "min_confidence", "review_sla_minutes", "priority", "priorities"}
    unknown = sorted(set(policy) - known)
    if unknown:
        return f"Unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})."
    for key, choices in POLICY_CHOICES.items():
        if key in policy and policy[key] not in choices:
            return f"{key} is one of {', '.join(choices)}."
    confidence = policy.get("min_confidence")
    if confidence is not None and not (
        isinstance(confidence, int | float)
        and not isinstance(confidence, bool)
        and 0 <= confidence <= 1
    ):
        return "min_confidence is a number from 0 to 1."
    sla = policy.get("review_sla_minutes")
    if sla is not None and not (
        isinstance(sla, int | float) and not isinstance(sla, bool) and 1 <= sla <= 525_600
    ):
        return "review_sla_minutes is a number of minutes from 1 to 525600 (a year)."
    if "priority" in policy and policy["priority"] not in PRIORITY_NAMES:
        return f"priority is one of {', '.join(PRIORITY_NAMES)}."
    priorities = policy.get("priorities", {})
    if not isinstance(priorities, dict) or any(
        v not in PRIORITY_NAMES for v in priorities.values()
    ):
        return f"priorities maps a reason to one of {', '.join(PRIORITY_NAMES)}."
    return ""


# The agent's fields a version freezes (with its grants); the rest (name, limits per minute,
# rollout) are live.
VERSIONED_FIELDS = (
    "model_route",
    "system_prompt",
    "max_steps",
    "max_tokens_per_run",
    "max_input_tokens",
    "max_output_tokens",
    "max_cost",
    "max_wall_seconds",
    "fallback_routes",
    "routine_route",
    "routine_steps",
    "temperature",
    "escalation_policy",
    "output_schema",
    "script",
)


class Agent(models.Model):
    """An agent as operators edit it. Saving a changed configuration publishes a new version."""

    slug = models.SlugField(unique=True, max_length=80)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    is_active = models.BooleanField(default=True)

    # The editable configuration; a run never reads it directly but through an AgentVersion.
    model_route = models.CharField(
        max_length=200,
        validators=[ROUTE_VALIDATOR],
        default="scripted:demo",
        help_text="provider:model, e.g. scripted:demo or local:llama-3.1-8b",
    )
    system_prompt = models.TextField(blank=True)
    # Which tools the agent may call, and how, are its ToolGrant rows (tools.models).
    max_steps = models.PositiveIntegerField(
        default=20, validators=[MinValueValidator(1)], help_text="Steps (model + tool) per run."
    )
    max_tokens_per_run = models.PositiveIntegerField(
        default=100_000, help_text="Input plus output tokens per run; 0 means no limit."
    )
    max_input_tokens = models.PositiveIntegerField(
        default=0, help_text="Input tokens per run; 0 means no limit."
    )
    max_output_tokens = models.PositiveIntegerField(
        default=0, help_text="Output tokens per run; 0 means no limit."
    )
    max_cost = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="Cost per run, in the price table's currency; 0 means no limit.",
    )
    max_wall_seconds = models.PositiveIntegerField(
        default=0, help_text="Seconds from a run's start to its last model call; 0: no limit."
    )
    fallback_routes = models.JSONField(
        default=list,
        blank=True,
        help_text='Routes tried in order when the primary fails, e.g. ["backup:gpt-4o-mini"].',
    )
    routine_route = models.CharField(
        max_length=200,
        blank=True,
        validators=[ROUTE_VALIDATOR],
        help_text="A cheaper route for routine turns (see routine steps); blank: none.",
    )
    routine_steps = models.CharField(
        max_length=20, blank=True, choices=RoutineSteps.choices, default=RoutineSteps.NONE
    )
    temperature = models.FloatField(default=0.0)
    escalation_policy = models.JSONField(
        default=dict, blank=True, help_text="When to ask a human (used by the review queue)."
    )
    # Live settings, not part of a version: changing them publishes nothing.
    requests_per_minute = models.PositiveIntegerField(
        default=0, help_text="Model calls per minute across all workers; 0 means no limit."
    )
    tokens_per_minute = models.PositiveIntegerField(
        default=0, help_text="Model tokens per minute across all workers; 0 means no limit."
    )
    canary_version = models.ForeignKey(
        "AgentVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="A version rolled out to a share of new runs (canary_percent).",
    )
    canary_percent = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(100)],
        help_text="Share of new runs (0-100) that use the canary version.",
    )
    output_schema = models.JSONField(
        null=True, blank=True, help_text="Optional JSON schema the final answer must satisfy."
    )
    script = models.JSONField(
        default=list,
        blank=True,
        help_text=(
            'For scripted:* routes, the model\'s turns: a list of {"text": ...} or '
            '{"tool_calls": [{"name": ..., "arguments": {...}}]}. '
            "Templates: {input}, {last_tool_result}, {tool_results}."
        ),
    )

    current_version = models.ForeignKey(
        "AgentVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if not isinstance(self.script, list):
            errors["script"] = "A list of turns."
        if self.output_schema is not None and not isinstance(self.output_schema, dict):
            errors["output_schema"] = "A JSON schema object."
        routes = routes_problem(self.fallback_routes)
        if routes:
            errors["fallback_routes"] = routes
        if self.routine_steps and not self.routine_route:
            errors["routine_route"] = "Routine steps need a routine route."
        if not isinstance(self.escalation_policy, dict):
            errors["escalation_policy"] = "A JSON object."
        else:
            problem = escalation_policy_problem(self.escalation_policy)
            if problem:
                errors["escalation_policy"] = problem
        if self.output_schema is not None:
            schema_error = schema_problem(self.output_schema)
            if schema_error:
                errors["output_schema"] = schema_error[0].upper() + schema_error[1:] + "."
        if errors:
            raise ValidationError(errors)

    def snapshot(self) -> dict[str, Any]:
        """The configuration a version freezes, grants included."""
        grants = (
            {g.tool.name: g.snapshot() for g in self.grants.select_related("tool")}
            if self.pk is not None
            else {}
        )
        return {
            **{name: getattr(self, name) for name in VERSIONED_FIELDS},
            # As text with its six places, so 0 and 0.000000 (from the form) are one version.
            "max_cost": f"{Decimal(self.max_cost or 0):.6f}",
            "tools": sorted(grants),
            "grants": grants,
        }


class AgentVersion(models.Model):
    """An immutable snapshot of an agent's configuration; a run pins the one it started with."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    model_route = models.CharField(max_length=200, validators=[ROUTE_VALIDATOR])
    system_prompt = models.TextField(blank=True)
    tools = models.JSONField(default=list)
    # {tool name: {"mode": "allow" | "require_approval", "constraints": {...}}}
    grants = models.JSONField(default=dict)
    max_steps = models.PositiveIntegerField()
    max_tokens_per_run = models.PositiveIntegerField()
    max_input_tokens = models.PositiveIntegerField(default=0)
    max_output_tokens = models.PositiveIntegerField(default=0)
    max_cost = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    max_wall_seconds = models.PositiveIntegerField(default=0)
    fallback_routes = models.JSONField(default=list)
    routine_route = models.CharField(max_length=200, blank=True)
    routine_steps = models.CharField(max_length=20, blank=True, choices=RoutineSteps.choices)
    temperature = models.FloatField(default=0.0)
    escalation_policy = models.JSONField(default=dict)
    output_schema = models.JSONField(null=True, blank=True)
    script = models.JSONField(default=list)
    digest = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["agent", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "number"], name="agentversion_unique_number")
        ]

    def __str__(self) -> str:
        return f"{self.agent.slug} v{self.number}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValidationError("Agent versions are immutable; publish a new version instead.")
        super().save(*args, **kwargs)

    @property
    def policy(self) -> dict[str, Any]:
        """The escalation policy (validated when the agent was saved), always a dict."""
        return self.escalation_policy if isinstance(self.escalation_policy, dict) else {}

    @staticmethod
    def digest_of(snapshot: dict[str, Any]) -> str:
        # default=str: max_cost is a Decimal (its text is exact).
        text = json.dumps(snapshot, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def budget(self) -> dict[str, Any]:
        """The version's limits, in the shape a run's ``budget`` overrides (0: no limit)."""
        return {
            "max_steps": self.max_steps,
            "max_tokens": self.max_tokens_per_run,
            "max_input_tokens": self.max_input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "max_cost": str(self.max_cost),
            "max_wall_seconds": self.max_wall_seconds,
        }


class ApiKey(models.Model):
    """A client's credential: ``Authorization: Bearer <key>``. Only a hash of the key is kept."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or self.user})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class Session(models.Model):
    """Conversation memory shared by the runs that name it: the model sees earlier turns.

    Clients name a session with their own ``key`` (e.g. their conversation id)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    key = models.CharField(max_length=200, default=new_trace_id)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="agent_sessions",
    )
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="sessions")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "key"], name="session_unique_owner_key")
        ]

    def __str__(self) -> str:
        return self.key


class Run(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        WAITING_APPROVAL = "waiting_approval"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    FINAL_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING, Status.WAITING_APPROVAL)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="runs")
    agent_version = models.ForeignKey(AgentVersion, on_delete=models.PROTECT, related_name="runs")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="agent_runs",
    )
    session = models.ForeignKey(
        Session, null=True, blank=True, on_delete=models.PROTECT, related_name="runs"
    )
    model_route = models.CharField(
        max_length=200,
        validators=[ROUTE_VALIDATOR],
        help_text="The route this run calls: the version's, or an override given at submission.",
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    input = models.JSONField()
    metadata = models.JSONField(default=dict, blank=True)
    # The limits this run has (AgentVersion.budget(), tightened by the client at submission).
    # Empty on runs from before budgets were recorded per run: the version's apply.
    budget = models.JSONField(default=dict, blank=True)
    # A client's Idempotency-Key and the digest of the request it came with.
    idempotency_key = models.CharField(max_length=200, blank=True)
    request_digest = models.CharField(max_length=64, blank=True)
    webhook_url = models.URLField(max_length=1000, blank=True)
    webhook_status = models.CharField(
        max_length=12, blank=True, help_text="pending, delivered or failed"
    )
    webhook_attempts = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    cancel_requested = models.BooleanField(default=False)
    result = models.JSONField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal("0"))
    # The trace the run's spans and log lines belong to: the submitting request's (a client's
    # W3C traceparent, or one made up), and that request's span, the parent of the run's steps.
    trace_id = models.CharField(max_length=32, default=new_trace_id, editable=False)
    trace_span_id = models.CharField(max_length=16, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Bumped on every transition and step; the reconciler nudges active runs that stop moving.
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "updated_at"], name="run_status_updated"),
            models.Index(fields=["owner", "-created_at"], name="run_owner_created"),
            models.Index(fields=["session", "created_at"], name="run_session_created"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="run_unique_owner_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return f"run {self.id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL_STATUSES


class Step(models.Model):
    """One unit of work in a run: a model call or a tool call. (run, index) is its key."""

    class Kind(models.TextChoices):
        MODEL = "model"
        TOOL = "tool"

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        REFUSED = "refused"  # a tool call the agent may not make, or with invalid arguments
        CANCELLED = "cancelled"
        AWAITING_APPROVAL = "awaiting_approval"  # a tool call held for a human reviewer

    DONE_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.REFUSED, Status.CANCELLED)

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps")
    index = models.PositiveIntegerField()
    kind = models.CharField(max_length=10, choices=Kind.choices)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    # Tool steps remember the model step whose turn asked for them.
    parent_index = models.PositiveIntegerField(null=True, blank=True)
    model_route = models.CharField(max_length=200, blank=True)
    tool_name = models.CharField(max_length=100, blank=True)
    tool_call_id = models.CharField(max_length=200, blank=True)
    request = models.JSONField(default=dict, blank=True)
    response = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # A step waiting out a retry backoff is not taken before this time.
    not_before = models.DateTimeField(null=True, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal("0"))
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "index"]
        constraints = [
            models.UniqueConstraint(fields=["run", "index"], name="step_unique_run_index"),
        ]
        indexes = [
            # manage.py stats: latencies of the steps finished in a window (calls that ran).
            models.Index(
                fields=["finished_at"],
                name="step_finished_latency",
                condition=models.Q(latency_ms__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        what = self.tool_name if self.kind == self.Kind.TOOL else self.model_route
        return f"step {self.index} {self.kind} {what} ({self.status})"

    @property
    def idempotency_key(self) -> str:
        """Stable across redeliveries: a tool uses it so an external side effect happens once."""
        key = f"{self.run_id}:{self.index}"
        return f"{key}:{self.tool_call_id}" if self.tool_call_id else key


class ModelProvider(models.Model):
    """An OpenAI-compatible provider edited in the admin; overrides the environment's entry."""

    name = models.SlugField(
        unique=True, max_length=50, help_text="The provider part of a route: 'local' in 'local:m'."
    )
    base_url = models.URLField(max_length=500)
    api_key_encrypted = models.TextField(blank=True, editable=False)
    timeout_seconds = models.FloatField(default=60.0, validators=[MinValueValidator(0.1)])
    requests_per_minute = models.PositiveIntegerField(
        default=0, help_text="The provider's request limit, kept by all workers; 0: none."
    )
    tokens_per_minute = models.PositiveIntegerField(
        default=0, help_text="The provider's token limit, kept by all workers; 0: none."
    )
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.name == "scripted":
            raise ValidationError({"name": "'scripted' is the built-in provider's name."})

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)


class ModelPrice(models.Model):
    """What a model costs, per million tokens. ``route`` is 'provider:model', or 'provider:*'
    for every model of a provider without a row of its own."""

    route = models.CharField(
        max_length=200,
        unique=True,
        validators=[ROUTE_VALIDATOR],
        help_text="provider:model, or provider:* for the provider's other models",
    )
    input_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal("0"))]
    )
    output_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal("0"))]
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["route"]

    def __str__(self) -> str:
        return f"{self.route}: {self.input_per_million} in / {self.output_per_million} out"
