"""Admin for agents (editable, versioned on save), runs and steps (read-only), providers."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, F, Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from agentsite.jsonparse import JSONFormField
from approvals.models import Approval
from tools.models import ToolGrant

from . import selectors, services, timeline
from .exceptions import RunAlreadyFinished, RunNotRetryable
from .models import (
    Agent,
    AgentVersion,
    ApiKey,
    ModelPrice,
    ModelProvider,
    Run,
    Session,
    Step,
)


class ReadOnlyAdminMixin:
    """Rows written by the engine are shown, never edited, added or deleted by hand."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AgentForm(forms.ModelForm):
    rollout_percent = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=99,
        label="Roll out as a canary to",
        help_text=(
            "Percent of new runs. Leave blank to publish the change to every new run; give a "
            "share to publish it as a canary next to the current version (promote or roll it "
            "back from the agents list)."
        ),
    )

    class Meta:
        model = Agent
        fields = [
            "slug",
            "name",
            "description",
            "is_active",
            "model_route",
            "system_prompt",
            "temperature",
            "script",
            "fallback_routes",
            "routine_route",
            "routine_steps",
            "max_steps",
            "max_tokens_per_run",
            "max_input_tokens",
            "max_output_tokens",
            "max_cost",
            "max_wall_seconds",
            "requests_per_minute",
            "tokens_per_minute",
            "escalation_policy",
            "output_schema",
        ]
        # Deep JSON or a lone surrogate is an error on the field, not a 500.
        field_classes = {
            name: JSONFormField
            for name in ("script", "fallback_routes", "escalation_policy", "output_schema")
        }


VERSION_FIELDS = (
    "number",
    "model_route",
    "tools",
    "max_steps",
    "digest",
    "created_at",
    "created_by",
)
STEP_FIELDS = (
    "index",
    "kind",
    "status",
    "model_route",
    "tool_name",
    "attempts",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cost",
    "error",
)


class AgentVersionInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = AgentVersion
    fields = readonly_fields = VERSION_FIELDS
    extra = 0
    show_change_link = True
    ordering = ["-number"]


class ToolGrantForm(forms.ModelForm):
    mode = forms.ChoiceField(
        choices=[("", "The tool's default"), *ToolGrant.Mode.choices],
        required=False,
        help_text="Blank: the tool's default (side-effecting tools require approval).",
    )

    class Meta:
        model = ToolGrant
        fields = ["tool", "mode", "constraints"]
        field_classes = {"constraints": JSONFormField}

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        tool = cleaned.get("tool")
        if tool is not None and not tool.available and "tool" in self.changed_data:
            # Existing grants of a tool whose code is gone stay editable (and removable).
            self.add_error("tool", f"{tool.name} is not installed on this server.")
        if not cleaned.get("mode") and tool is not None:
            cleaned["mode"] = tool.default_mode
            self.instance.mode = tool.default_mode
        return cleaned


class ToolGrantInline(admin.TabularInline):
    """The tools this agent may call; a call to any other tool is refused without executing."""

    model = ToolGrant
    form = ToolGrantForm
    extra = 0
    verbose_name = "tool grant"
    verbose_name_plural = "Tool grants (no grant, no call)"


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    form = AgentForm
    list_display = [
        "slug",
        "name",
        "model_route",
        "is_active",
        "current_version",
        "canary",
        "updated_at",
    ]
    list_filter = ["is_active"]
    search_fields = ["slug", "name", "description"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = [
        "current_version",
        "canary_version",
        "canary_percent",
        "created_at",
        "updated_at",
    ]
    inlines = [ToolGrantInline, AgentVersionInline]
    actions = ["promote_canaries", "roll_back_canaries"]
    fieldsets = [
        (None, {"fields": ["slug", "name", "description", "is_active", "current_version"]}),
        (
            "Model",
            {
                "fields": [
                    "model_route",
                    "fallback_routes",
                    "routine_route",
                    "routine_steps",
                    "system_prompt",
                    "temperature",
                    "script",
                ]
            },
        ),
        (
            "Budgets and policy",
            {
                "fields": [
                    "max_steps",
                    "max_tokens_per_run",
                    "max_input_tokens",
                    "max_output_tokens",
                    "max_cost",
                    "max_wall_seconds",
                    "escalation_policy",
                    "output_schema",
                ]
            },
        ),
        (
            "Rate limits (live, all workers)",
            {"fields": ["requests_per_minute", "tokens_per_minute"]},
        ),
        ("Rollout", {"fields": ["rollout_percent", "canary_version", "canary_percent"]}),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    @admin.display(description="Canary")
    def canary(self, obj: Agent) -> str:
        if obj.canary_version_id is None:
            return "-"
        return f"v{obj.canary_version.number} at {obj.canary_percent}%"  # type: ignore[union-attr]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Agent]:
        return super().get_queryset(request).select_related("current_version", "canary_version")

    def save_model(self, request: HttpRequest, obj: Agent, form: Any, change: bool) -> None:
        # Saved now, published once its grants (inlines) are saved too: see save_related.
        # (Kept on the request: one ModelAdmin instance serves every request and thread.)
        request._agentsite_version_before = obj.current_version  # type: ignore[attr-defined]
        request._agentsite_canary_before = obj.canary_version  # type: ignore[attr-defined]
        obj.save()

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        agent: Agent = form.instance
        percent = form.cleaned_data.get("rollout_percent") or 0
        version = services.publish_agent_version(
            agent=agent,
            user=request.user,  # type: ignore[arg-type]
            canary_percent=percent,
        )
        before = {
            getattr(request, "_agentsite_version_before", None),
            getattr(request, "_agentsite_canary_before", None),
        }
        if change and version not in before:
            self.message_user(
                request,
                (
                    f"Published {version} as a canary for {percent}% of new runs; the others "
                    f"keep {agent.current_version}."
                    if percent and version == agent.canary_version
                    else f"Published {version}; runs already started keep their version "
                    "(a grant removed or narrowed applies to them at once)."
                ),
                messages.INFO,
            )

    @admin.action(description="Promote the canary to every new run", permissions=["change"])
    def promote_canaries(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        for agent in queryset.filter(canary_version__isnull=False):
            version = services.promote_canary(agent=agent, user=request.user)  # type: ignore[arg-type]
            self.message_user(request, f"{version} now serves every new run.")

    @admin.action(description="Roll back the canary", permissions=["change"])
    def roll_back_canaries(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        for agent in queryset.filter(canary_version__isnull=False):
            version = services.roll_back_canary(agent=agent, user=request.user)  # type: ignore[arg-type]
            self.message_user(
                request,
                f"Rolled back {version}; new runs use {agent.current_version} and the agent's "
                "settings are that version's again.",
            )


@admin.register(AgentVersion)
class AgentVersionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Versions side by side: how their runs ended and what they cost (a canary's report)."""

    list_display = [
        "agent",
        "number",
        "model_route",
        "runs",
        "success_rate",
        "cost_per_run",
        "tokens_per_run",
        "created_at",
    ]
    list_filter = ["agent"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[AgentVersion]:
        return (
            super()
            .get_queryset(request)
            .select_related("agent")
            .annotate(
                n_runs=Count("runs"),
                n_succeeded=Count("runs", filter=Q(runs__status=Run.Status.SUCCEEDED)),
                n_failed=Count("runs", filter=Q(runs__status=Run.Status.FAILED)),
                total_cost=Sum("runs__cost"),
                total_tokens=Sum(F("runs__input_tokens") + F("runs__output_tokens")),
            )
        )

    @admin.display(ordering="n_runs")
    def runs(self, obj: Any) -> int:
        return int(obj.n_runs)

    @admin.display(description="Success")
    def success_rate(self, obj: Any) -> str:
        finished = obj.n_succeeded + obj.n_failed
        return f"{obj.n_succeeded / finished:.1%}" if finished else "-"

    @admin.display(description="Cost / run")
    def cost_per_run(self, obj: Any) -> str:
        return f"{obj.total_cost / obj.n_runs:.6f}" if obj.n_runs else "-"

    @admin.display(description="Tokens / run")
    def tokens_per_run(self, obj: Any) -> str:
        return f"{obj.total_tokens / obj.n_runs:.0f}" if obj.n_runs else "-"


class StepInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Step
    fields = readonly_fields = STEP_FIELDS
    extra = 0
    show_change_link = True
    ordering = ["index"]


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "agent",
        "status",
        "owner",
        "model_route",
        "input_tokens",
        "output_tokens",
        "cost",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "agent", "error_code", "created_at"]
    search_fields = ["id", "trace_id", "agent__slug", "owner__username"]
    list_select_related = ["agent", "owner"]
    date_hierarchy = "created_at"
    inlines = [StepInline]
    actions = ["cancel_runs", "retry_runs"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The change permission gates the cancel action on the list; a run's own page is
        # view-only, so a Save can never write a stale copy of a run the engine is advancing.
        return obj is None and super().has_change_permission(request)

    def save_model(self, request: HttpRequest, obj: Run, form: Any, change: bool) -> None:
        return None  # runs change only through services and the engine

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in Run._meta.fields]

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Run | None = None,
    ) -> HttpResponse:
        # The timeline (admin/agents/run/timeline.html, between the fields and the steps):
        # two queries however long the run.
        if obj is not None:
            now = timezone.now()
            context["timeline"] = timeline.run_timeline(obj, now=now)
            stuck = selectors.run_waits_unserved(obj, now=now)
            if stuck:
                messages.warning(request, stuck)
            site = self.admin_site
            context["timeline_links_approvals"] = site.is_registered(
                Approval
            ) and site.get_model_admin(Approval).has_view_permission(request)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method == "GET":  # not again on an action's POST, which redirects here
            now = timezone.now()
            for queue in selectors.unserved_queues(now=now) or []:
                if queue.runs_waiting:
                    messages.warning(request, queue.describe(now))
        return super().changelist_view(request, extra_context)

    @admin.action(description="Cancel the selected runs", permissions=["change"])
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        cancelled = skipped = 0
        for run_id in queryset.values_list("pk", flat=True):
            try:
                services.cancel_run(run_id=run_id, user=request.user)  # type: ignore[arg-type]
                cancelled += 1
            except RunAlreadyFinished:
                skipped += 1
        self.message_user(request, f"Cancelled {cancelled} runs; {skipped} had already finished.")

    @admin.action(
        description="Retry the selected failed runs (from the failed step)", permissions=["change"]
    )
    def retry_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        retried = 0
        refused: list[str] = []
        for run_id in queryset.values_list("pk", flat=True):
            try:
                services.retry_run(run_id=run_id, user=request.user)  # type: ignore[arg-type]
                retried += 1
            except RunNotRetryable as exc:
                refused.append(str(exc))
        self.message_user(request, f"Retried {retried} runs from their failed step.")
        for reason in refused[:10]:
            self.message_user(request, f"Not retried: {reason}", level=messages.WARNING)
        if len(refused) > 10:
            self.message_user(
                request, f"… and {len(refused) - 10} more not retried.", level=messages.WARNING
            )


@admin.register(Step)
class StepAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "run",
        "index",
        "kind",
        "status",
        "model_route",
        "tool_name",
        "attempts",
        "latency_ms",
        "created_at",
    ]
    list_filter = ["kind", "status", "tool_name"]
    search_fields = ["run__id", "tool_name", "tool_call_id"]


@admin.register(Session)
class SessionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "agent", "owner", "created_at"]
    list_filter = ["agent"]


class ModelProviderForm(forms.ModelForm):
    base_url = forms.URLField(
        assume_scheme="https",
        max_length=500,
        help_text="The OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1",
    )
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text=(
            "Write-only: stored encrypted and never shown. Leave blank to keep the current key."
        ),
    )
    clear_api_key = forms.BooleanField(required=False, label="Remove the stored key")

    class Meta:
        model = ModelProvider
        fields = [
            "name",
            "base_url",
            "timeout_seconds",
            "requests_per_minute",
            "tokens_per_minute",
            "enabled",
        ]


@admin.register(ModelProvider)
class ModelProviderAdmin(admin.ModelAdmin):
    form = ModelProviderForm
    list_display = [
        "name",
        "base_url",
        "requests_per_minute",
        "tokens_per_minute",
        "enabled",
        "has_api_key",
        "updated_at",
    ]

    @admin.display(boolean=True, description="API key set")
    def has_api_key(self, obj: ModelProvider) -> bool:
        return obj.has_api_key

    def save_model(self, request: HttpRequest, obj: ModelProvider, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if form.cleaned_data.get("clear_api_key"):
            services.set_provider_api_key(provider=obj, api_key="")
        elif form.cleaned_data.get("api_key"):
            services.set_provider_api_key(provider=obj, api_key=form.cleaned_data["api_key"])


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created with ``manage.py create_api_key`` (the plain key is shown only there);
    here they are listed and revoked."""

    list_display = ["prefix", "name", "user", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["prefix", "name", "user__username"]
    readonly_fields = ["user", "prefix", "created_at", "last_used_at", "revoked_at"]
    fields = ["name", *readonly_fields]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            services.revoke_api_key(api_key=key, by=request.user)  # type: ignore[arg-type]
        self.message_user(request, f"Revoked {queryset.count()} keys.")


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Per million tokens. Workers see an edit within 10 seconds."""

    list_display = ["route", "input_per_million", "output_per_million", "updated_at"]
    search_fields = ["route"]
