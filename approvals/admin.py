"""The human review queue: escalations listed most urgent first, a page per escalation that shows
what the reviewer decides on, and the decision (approve, edit then approve, reject).

Approvals are never added, edited or deleted as rows: their page is the decision form, and every
decision goes through ``approvals.services.decide`` (which enforces the ``decide_approval``
permission and the four-eyes rule, and takes each decision exactly once).
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.templatetags.admin_urls import add_preserved_filters
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince

from agents.models import Run
from agentsite import jsonparse

from . import exceptions, selectors, services
from .models import Approval, Decision

QUEUE_TEMPLATE_DIR = "admin/approvals/approval"
REVIEW_TEMPLATE = f"{QUEUE_TEMPLATE_DIR}/review.html"
REJECT_TEMPLATE = f"{QUEUE_TEMPLATE_DIR}/reject_confirmation.html"

# What "edit" means, and what the buttons say, for each reason.
EDIT_FIELD: dict[str, str] = {
    Approval.Reason.TOOL_REQUIRES_APPROVAL: "arguments",
    Approval.Reason.MODEL_REQUESTED: "output",
    Approval.Reason.LOW_CONFIDENCE: "output",
    Approval.Reason.OUTPUT_INVALID: "output",
    Approval.Reason.BUDGET_EXHAUSTED: "output",
}
BUTTONS: dict[str, tuple[str, str, str]] = {
    Approval.Reason.TOOL_REQUIRES_APPROVAL: (
        "Approve",
        "Edit, then approve",
        "Reject",
    ),
    Approval.Reason.MODEL_REQUESTED: (
        "Approve (reply with the comment)",
        "Reply with this answer",
        "Reject (no help)",
    ),
    Approval.Reason.LOW_CONFIDENCE: (
        "Approve the answer",
        "Edit, then approve",
        "Reject (the run fails)",
    ),
    Approval.Reason.OUTPUT_INVALID: (
        "Approve the answer",
        "Edit, then approve",
        "Reject (the run fails)",
    ),
    Approval.Reason.BUDGET_EXHAUSTED: (
        "Approve another budget",
        "Finish the run with this answer",
        "Reject (the run fails)",
    ),
}


def pretty(value: Any) -> str:
    """A value as a reviewer reads it: text as it is, anything else as indented JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _text(value: str) -> str:
    """A textarea's value as typed (browsers post CRLF line ends)."""
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _is_json_text(value: Any) -> bool:
    return not isinstance(value, str) and value is not None


# --- The decision form -----------------------------------------------------------------------


class DecisionForm(forms.Form):
    """Approve, edit then approve, or reject. The decision is the button pressed; the edit field
    is ``arguments`` (a tool call's arguments, JSON) or ``output`` (the answer, or the reply to
    an agent that asked for help), named as ``services.decide`` names them in its errors."""

    decision = forms.ChoiceField(
        choices=[(d, d) for d in services.DECISIONS],
        error_messages={"required": "Choose approve, edit or reject."},
    )
    comment = forms.CharField(
        required=False,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80, "class": "vLargeTextField"}),
        help_text="Required to reject. Kept with the decision and in the audit trail.",
    )

    def __init__(self, *args: Any, approval: Approval, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.approval = approval
        self.edit_field = EDIT_FIELD.get(approval.reason, "output")
        self.schema = approval.run.agent_version.output_schema
        self.initial_text = self._initial_text()
        self.fields[self.edit_field] = forms.CharField(
            required=False,
            strip=False,
            initial=self.initial_text,
            label=self._edit_label(),
            help_text=self._edit_help(),
            widget=forms.Textarea(
                attrs={"rows": 10, "cols": 80, "class": "vLargeTextField approval-code"}
            ),
        )
        self.value: Any = None  # the parsed edit, for decide()

    def _initial_text(self) -> str:
        if self.edit_field == "arguments":
            return pretty(self.approval.proposed_arguments)
        if self.approval.reason == Approval.Reason.MODEL_REQUESTED:
            return ""  # the reviewer's answer to the agent
        return pretty(self.approval.proposed_output)

    def _edit_label(self) -> str:
        if self.edit_field == "arguments":
            return f"Arguments for {self.approval.tool_name} (JSON)"
        if self.approval.reason == Approval.Reason.MODEL_REQUESTED:
            return "Your answer to the agent"
        return "The answer (JSON)" if self.schema else "The answer"

    def _edit_help(self) -> str:
        if self.edit_field == "arguments":
            return (
                "To change what runs, edit the JSON object and press “Edit, then approve”; it is "
                "validated like the agent's own arguments."
            )
        if self.approval.reason == Approval.Reason.MODEL_REQUESTED:
            return "Plain text; the agent reads it as the human's answer."
        if self.schema:
            return "JSON matching the agent's output schema."
        return "Plain text, or JSON (an object or a list) where the agent answered with JSON."

    def _parse(self, text: str) -> Any:
        """The edit as decide() takes it; raises ValueError with a message for the field."""
        if self.edit_field == "arguments":
            return _json(text)
        if self.approval.reason == Approval.Reason.MODEL_REQUESTED:
            return text.strip()
        if self.schema:
            return _json(text)
        if _is_json_text(self.approval.proposed_output) and text.lstrip()[:1] in ("{", "["):
            return _json(text)
        return text.strip()

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        decision = cleaned.get("decision")
        text = _text(cleaned.get(self.edit_field) or "")
        if decision == Decision.EDIT:
            if not text.strip():
                what = "arguments" if self.edit_field == "arguments" else "answer"
                self.add_error(self.edit_field, f"Enter the {what} to use.")
                return cleaned
            try:
                self.value = self._parse(text)
            except ValueError as exc:
                self.add_error(self.edit_field, str(exc))
        elif decision == Decision.APPROVE and text.strip() and self._changed(text):
            # Approve takes the proposal as it is: an edit here would be silently dropped.
            self.add_error(
                self.edit_field,
                f"You changed this: press “{BUTTONS[self.approval.reason][1]}” to use "
                "your version, or put the proposal back to approve it as it is.",
            )
        return cleaned

    def _changed(self, text: str) -> bool:
        if text.strip() == self.initial_text.strip():
            return False
        if self.edit_field == "arguments":
            proposed: Any = self.approval.proposed_arguments
        elif _is_json_text(self.approval.proposed_output):
            proposed = self.approval.proposed_output
        else:
            return True
        try:  # reformatted JSON is the same proposal
            return bool(jsonparse.loads(text) != proposed)
        except ValueError:
            return True


def _json(text: str) -> Any:
    try:
        return jsonparse.loads(text)
    except jsonparse.JsonInputError as exc:
        raise ValueError(exc.message) from None
    except ValueError as exc:
        raise ValueError(f"Not valid JSON: {exc}.") from None


# --- Filters ---------------------------------------------------------------------------------


class StatusFilter(admin.SimpleListFilter):
    """Pending by default (the queue); "All" shows decided ones too."""

    title = "status"
    parameter_name = "status"
    ALL = "all"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [*((str(v), str(label)) for v, label in Approval.Status.choices), (self.ALL, "All")]

    def choices(self, changelist: Any) -> Any:
        current = self.value() or Approval.Status.PENDING
        for lookup, title in self.lookup_choices:
            yield {
                "selected": current == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value() or Approval.Status.PENDING
        if value == self.ALL:
            return queryset
        return queryset.filter(status=value)


class AgentFilter(admin.SimpleListFilter):
    title = "agent"
    parameter_name = "agent"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(slug, slug) for slug in selectors.agents_with_escalations()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value():
            return queryset.filter(run__agent__slug=self.value())
        return queryset


class OverdueFilter(admin.SimpleListFilter):
    """Overdue: still pending after its due time."""

    title = "overdue"
    parameter_name = "overdue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Overdue"), ("no", "Not overdue")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        overdue = selectors.overdue()
        if self.value() == "yes":
            return queryset.filter(overdue)
        if self.value() == "no":
            return queryset.exclude(overdue)
        return queryset


# --- The queue -------------------------------------------------------------------------------


@admin.register(Approval)
class ApprovalAdmin(admin.ModelAdmin):
    list_display = [
        "reason_label",
        "agent",
        "tool",
        "priority_label",
        "due",
        "age",
        "run_ref",
        "status",
    ]
    list_display_links = ["reason_label"]
    list_filter = [StatusFilter, AgentFilter, "reason", "priority", OverdueFilter]
    list_select_related = ["run", "run__agent", "decided_by"]
    search_fields = ["tool_name", "detail", "comment", "run__agent__slug"]
    ordering = ["-priority", "due_at", "created_at"]
    actions = ["bulk_approve", "bulk_reject"]
    list_per_page = 50
    show_full_result_count = False  # "N total" would link back to the default (pending) view

    # --- permissions: a decision page, never a ModelForm ---

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # rows change only through services.decide (the review page's form)

    def has_decide_permission(self, request: HttpRequest) -> bool:
        return services.can_decide(request.user)

    # --- columns ---

    @admin.display(description="reason", ordering="reason")
    def reason_label(self, obj: Approval) -> str:
        return obj.get_reason_display()

    @admin.display(description="agent", ordering="run__agent__slug")
    def agent(self, obj: Approval) -> str:
        return obj.run.agent.slug

    @admin.display(description="tool", ordering="tool_name")
    def tool(self, obj: Approval) -> str:
        return obj.tool_name or "— (the answer)"

    @admin.display(description="priority", ordering="priority")
    def priority_label(self, obj: Approval) -> str:
        label = obj.get_priority_display()
        if obj.priority >= Approval.Priority.HIGH:
            return format_html("<strong>{}</strong>", label)
        return label

    @admin.display(description="due", ordering="due_at")
    def due(self, obj: Approval) -> str:
        if obj.due_at is None:
            return "—"
        when = timezone.localtime(obj.due_at).strftime("%Y-%m-%d %H:%M")
        if obj.is_overdue:
            return format_html(
                '{} <strong class="approval-overdue" style="color:#ba2121">OVERDUE</strong>', when
            )
        return when

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: Approval) -> str:
        return timesince(obj.created_at)

    def get_list_display(self, request: HttpRequest) -> Any:
        # The run column links to the run's page only for users who may see runs (reviewers
        # may not; they get the run's id).
        can_see_runs = request.user.has_perm("agents.view_run")

        @admin.display(description="run")
        def run_ref(obj: Approval) -> str:
            return _run_ref(obj.run_id, link=can_see_runs)

        return [run_ref if name == "run_ref" else name for name in self.list_display]

    def run_ref(self, obj: Approval) -> str:  # replaced per request in get_list_display
        return _run_ref(obj.run_id, link=False)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {"title": "Review queue", "subtitle": None, "module_name": "escalations"}
        return super().changelist_view(request, {**context, **(extra_context or {})})

    # --- the review page (the change view) ---

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        approval = self.get_object(request, unquote(object_id))
        if approval is None:
            self.message_user(
                request, f"No escalation with id {object_id!r} was found.", messages.WARNING
            )
            return HttpResponseRedirect(self._queue_url(request))
        if not self.has_view_permission(request, approval):
            raise PermissionDenied
        run = selectors.run_for_review(approval.run_id)
        approval.run = run
        not_allowed = ""
        if approval.status == Approval.Status.PENDING:
            try:
                services.check_reviewer(request.user, run)
            except exceptions.NotAllowedToDecide as exc:
                not_allowed = str(exc)
        form: DecisionForm | None = None
        status = 200
        if request.method == "POST" and not_allowed:
            status = 403  # the page says why; nothing is decided
        elif request.method == "POST":
            form = DecisionForm(request.POST, approval=approval)
            if form.is_valid():
                response = self._decide(request, approval, form)
                if response is not None:
                    return response
        elif approval.status == Approval.Status.PENDING and not not_allowed:
            form = DecisionForm(approval=approval)
        context = {
            **self.admin_site.each_context(request),
            **self._review_context(request, approval, run),
            "form": form,
            "edit_field": form[form.edit_field] if form is not None else None,
            "buttons": BUTTONS.get(approval.reason),
            "not_allowed": not_allowed,
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, REVIEW_TEMPLATE, context, status=status)

    def _decide(
        self, request: HttpRequest, approval: Approval, form: DecisionForm
    ) -> HttpResponse | None:
        """Apply the form's decision; a redirect on success (or if someone decided first),
        None with the errors on the form otherwise."""
        decision = form.cleaned_data["decision"]
        edit: dict[str, Any] = {}
        if decision == Decision.EDIT:
            edit[form.edit_field] = form.value
        try:
            decided = services.decide(
                approval.pk,
                decision=decision,
                user=request.user,
                comment=form.cleaned_data.get("comment", ""),
                **edit,
            )
        except exceptions.AlreadyDecided as exc:
            self.message_user(
                request,
                f"Already decided: {exc}. Your decision was not applied.",
                messages.WARNING,
            )
            return HttpResponseRedirect(self._queue_url(request))
        except exceptions.ApprovalNotFound as exc:
            self.message_user(request, f"Not found: {exc}.", messages.ERROR)
            return HttpResponseRedirect(self._queue_url(request))
        except exceptions.NotAllowedToDecide as exc:
            form.add_error(None, f"Not allowed: {exc}.")
            return None
        except exceptions.DecisionError as exc:
            field = exc.field if exc.field in form.fields else None
            if exc.field in ("arguments", "output") and field is None:
                field = form.edit_field
            form.add_error(field, str(exc))
            return None
        # The decision's record is the run's audit trail (approval.* events), written by decide().
        self.message_user(request, f"{_summary(decided)}.", messages.SUCCESS)
        return HttpResponseRedirect(self._queue_url(request))

    def _queue_url(self, request: HttpRequest) -> str:
        url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist")
        return add_preserved_filters(
            {"preserved_filters": self.get_preserved_filters(request), "opts": self.opts}, url
        )

    def _review_context(self, request: HttpRequest, approval: Approval, run: Run) -> dict[str, Any]:
        ctx = approval.context if isinstance(approval.context, dict) else {}
        steps = []
        for step in ctx.get("steps") or []:
            if not isinstance(step, dict):
                continue
            steps.append(
                {
                    "index": step.get("index"),
                    "kind": step.get("kind") or "",
                    "status": step.get("status") or "",
                    "tool": step.get("tool") or "",
                    "arguments": pretty(step.get("arguments")),
                    "text": _step_text(step),
                    "error": step.get("error") or "",
                    "is_subject": step.get("index") == approval.step_index,
                }
            )
        submitted_by = ctx.get("submitted_by")
        if submitted_by is None:
            submitted_by = run.owner.get_username() if run.owner else ""
        is_tool = approval.reason in (
            Approval.Reason.TOOL_REQUIRES_APPROVAL,
            Approval.Reason.MODEL_REQUESTED,
        )
        return {
            "title": f"Review: {approval.get_reason_display()}",
            "subtitle": None,
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "original": approval,
            "approval": approval,
            "run": run,
            "run_ref": _run_ref(run.pk, link=request.user.has_perm("agents.view_run")),
            "agent_slug": ctx.get("agent") or run.agent.slug,
            "agent_version": ctx.get("agent_version") or run.agent_version.number,
            "model_route": ctx.get("model_route") or run.model_route,
            "submitted_by": submitted_by or "— (no user: the CLI or the system)",
            "input_text": pretty(ctx.get("input", run.input)),
            "input_is_json": _is_json_text(ctx.get("input", run.input)),
            "is_tool": is_tool,
            "proposed_arguments": pretty(approval.proposed_arguments) if is_tool else "",
            "proposed_output": pretty(approval.proposed_output),
            "approved_arguments": pretty(approval.approved_arguments),
            "approved_output": pretty(approval.approved_output),
            "edited": _was_edited(approval),
            "steps": steps,
            "output_schema": pretty(run.agent_version.output_schema),
            "queue_url": self._queue_url(request),
            "preserved_filters": self.get_preserved_filters(request),
            "has_view_permission": True,
            "is_popup": False,
            "to_field": None,
        }

    # --- bulk actions ---

    def _selected(self, request: HttpRequest, queryset: QuerySet[Approval]) -> list[Any]:
        """The selected escalations, including any decided since the list was shown (the
        pending filter would otherwise hide them from the count)."""
        ids = list(queryset.values_list("pk", flat=True))
        if request.POST.get("select_across", "0") == "0":
            chosen = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
            extra = self.get_queryset(request).filter(pk__in=chosen).exclude(pk__in=ids)
            ids += list(extra.values_list("pk", flat=True))
        return ids

    def _bulk(self, request: HttpRequest, ids: list[Any], decision: str, comment: str) -> None:
        done = already = forbidden = 0
        failures: list[str] = []
        for approval_id in ids:
            try:
                services.decide(approval_id, decision=decision, user=request.user, comment=comment)
            except exceptions.AlreadyDecided:
                already += 1
            except exceptions.NotAllowedToDecide:
                forbidden += 1
            except exceptions.ApprovalNotFound:
                already += 1  # gone since the list was shown
            except exceptions.DecisionError as exc:
                failures.append(str(exc))
            else:
                done += 1
        verb = "approved" if decision == Decision.APPROVE else "rejected"
        report = f"{done} {verb}, {already} already decided, {forbidden} not allowed"
        if failures:
            report += f", {len(failures)} failed ({'; '.join(sorted(set(failures)))})"
        level = messages.SUCCESS if done and not (failures or forbidden) else messages.WARNING
        self.message_user(request, report + ".", level)

    @admin.action(
        description="Approve the selected escalations as proposed", permissions=["decide"]
    )
    def bulk_approve(self, request: HttpRequest, queryset: QuerySet[Approval]) -> None:
        self._bulk(request, self._selected(request, queryset), Decision.APPROVE, "")

    @admin.action(description="Reject the selected escalations…", permissions=["decide"])
    def bulk_reject(
        self, request: HttpRequest, queryset: QuerySet[Approval]
    ) -> HttpResponse | None:
        """First a confirmation page asking why; posting it with a comment rejects each."""
        ids = self._selected(request, queryset)
        error = ""
        if request.POST.get("post") == "yes":
            comment = (request.POST.get("comment") or "").strip()
            if comment:
                self._bulk(request, ids, Decision.REJECT, comment)
                return None
            error = "A rejection needs a comment saying why."
        approvals = list(
            self.get_queryset(request)
            .filter(pk__in=ids)
            .select_related("run", "run__agent")
            .order_by(*self.ordering)
        )
        context = {
            **self.admin_site.each_context(request),
            "title": "Reject the selected escalations",
            "subtitle": None,
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "approvals": approvals,
            "pending": [a for a in approvals if a.status == Approval.Status.PENDING],
            "comment": request.POST.get("comment", ""),
            "error": error,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "queue_url": self._queue_url(request),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, REJECT_TEMPLATE, context)


def _run_ref(run_id: Any, *, link: bool) -> str:
    short = str(run_id)[:8]
    if link:
        return format_html(
            '<a href="{}" title="{}">{}</a>',
            reverse("admin:agents_run_change", args=[run_id]),
            run_id,
            short,
        )
    return format_html('<span title="{}">{}</span>', run_id, short)


def _step_text(step: dict[str, Any]) -> str:
    text = step.get("text")
    if step.get("kind") == "model" and text == "null":
        return ""  # a model turn with only tool calls (its calls are the rows after it)
    return pretty(text)


def _was_edited(approval: Approval) -> bool:
    if approval.status != Approval.Status.APPROVED:
        return False
    if approval.is_about_a_tool_call:
        return (
            approval.approved_arguments is not None
            and approval.approved_arguments != approval.proposed_arguments
        )
    return approval.approved_output is not None and approval.approved_output != (
        approval.proposed_output
    )


def _summary(approval: Approval) -> str:
    """What the decision did, for the reviewer's message."""
    what = approval.tool_name or "the answer"
    reason = approval.reason
    if approval.status == Approval.Status.REJECTED:
        if approval.is_about_a_tool_call:
            return f"Rejected {what}; the agent is told why"
        return f"Rejected {what}; the run failed"
    if reason == Approval.Reason.MODEL_REQUESTED:
        return "Answered the agent; the run resumes"
    if reason == Approval.Reason.TOOL_REQUIRES_APPROVAL:
        edited = " with your edited arguments" if _was_edited(approval) else ""
        return f"Approved {what}{edited}; the run resumes"
    if reason == Approval.Reason.BUDGET_EXHAUSTED and approval.approved_output is None:
        return "Approved another budget; the run resumes"
    edited = " (edited)" if _was_edited(approval) else ""
    return f"Approved the answer{edited}; the run succeeded"
