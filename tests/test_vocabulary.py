"""The enums that name audit actions, run error codes, decisions and API error codes: every
name written in the code is one of them, and the error family renders as it did."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from rest_framework.test import APIRequestFactory

from agents import exceptions as agent_errors
from agents.errorcodes import RunErrorCode
from agents.providers import base as providers
from agentsite.errorhandler import api_exception_handler
from agentsite.errors import DomainError, ErrorCode
from approvals import exceptions as approval_errors
from approvals.models import Decision
from approvals.services import DECISIONS
from audittrail.actions import AuditAction

ROOT = Path(__file__).resolve().parents[1]
APPS = ("agents", "agentsite", "approvals", "audittrail", "tools")


def _names(value: ast.expr) -> list[tuple[int, str]]:
    """The action names an expression can evaluate to: a literal, either branch of a
    conditional, or the constant head of an f-string (``f"run.{status}"``: ``run.*``)."""
    if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value:
        return [(value.lineno, value.value)]
    if isinstance(value, ast.IfExp):
        return _names(value.body) + _names(value.orelse)
    if isinstance(value, ast.JoinedStr) and isinstance(value.values[0], ast.Constant):
        return [(value.lineno, f"{value.values[0].value}*")]
    return []


def _audit_action_literals() -> list[tuple[str, int, str]]:
    """Every action name the code passes as an audit action: ``audit.record("...")``, and
    ``action=`` / ``audit_action=`` arguments (the engine's transitions)."""
    found = []
    for app in APPS:
        for path in (ROOT / app).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                candidates = [k.value for k in node.keywords if k.arg in ("action", "audit_action")]
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr == "record"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "audit"
                    and node.args
                ):
                    candidates.append(node.args[0])
                for value in candidates:
                    where = str(path.relative_to(ROOT))
                    # ``action=`` is argparse's too ("store_true"): audit actions have a dot.
                    found += [(where, line, name) for line, name in _names(value) if "." in name]
    return found


def _is_member(name: str) -> bool:
    if name.endswith("*"):
        return any(action.startswith(name[:-1]) for action in AuditAction)
    return name in set(AuditAction)


def test_every_audit_action_written_is_a_member() -> None:
    """Names written as text (the engine's, until it uses the enum) must be members too."""
    literals = _audit_action_literals()
    unknown = [f"{p}:{line}: {value}" for p, line, value in literals if not _is_member(value)]
    assert unknown == []


def test_a_deferral_keeps_its_stored_name() -> None:
    """Stored events are sealed: the concept is renamed in the code, not in the data."""
    assert AuditAction.STEP_DEFERRED == "step.rate_limited"
    assert AuditAction("step.rate_limited") is AuditAction.STEP_DEFERRED


def test_provider_errors_carry_run_error_codes() -> None:
    for error in (
        providers.ProviderError,
        providers.TransientProviderError,
        providers.RateLimitedProviderError,
        providers.PermanentProviderError,
        providers.InvalidProviderResponse,
    ):
        assert error.code in set(RunErrorCode), error


def test_decisions_keep_their_order_and_spelling() -> None:
    assert DECISIONS == ("approve", "reject", "edit")
    assert [str(d) for d in Decision] == list(DECISIONS)


def _domain_errors() -> list[type[DomainError]]:
    found: list[type[DomainError]] = []
    pending = list(DomainError.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_domain_error_has_a_code_of_the_enum() -> None:
    errors = _domain_errors()
    assert agent_errors.TooManyActiveRuns in errors
    assert approval_errors.AlreadyDecided in errors
    for cls in errors:
        assert cls.code in set(ErrorCode), cls


@pytest.mark.parametrize(
    ("error", "status", "body", "retry_after"),
    [
        (
            agent_errors.AgentNotFound("no agent with slug 'x'"),
            400,
            {"code": "agent_not_found", "fields": {"agent": ["no agent with slug 'x'"]}},
            None,
        ),
        (
            agent_errors.InvalidRunInput("metadata bad", field="metadata"),
            400,
            {"code": "invalid_input", "fields": {"metadata": ["metadata bad"]}},
            None,
        ),
        (
            agent_errors.RunNotRetryable("no"),
            400,
            {"code": "run_not_retryable", "fields": {}},
            None,
        ),
        (
            agent_errors.SessionBusy("busy"),
            409,
            {"code": "session_busy", "fields": {"session": ["busy"]}},
            None,
        ),
        (agent_errors.TooManyActiveRuns("cap"), 429, {"code": "too_many_active_runs"}, "5"),
        (approval_errors.AlreadyDecided("done"), 409, {"code": "already_decided"}, None),
        (approval_errors.NotAllowedToDecide("no"), 403, {"code": "forbidden"}, None),
        (approval_errors.ApprovalNotFound("gone"), 404, {"code": "not_found"}, None),
        (
            approval_errors.DecisionError("needs a comment", field="comment"),
            400,
            {"code": "invalid_decision", "fields": {"comment": ["needs a comment"]}},
            None,
        ),
        (
            approval_errors.DecisionError("no longer waiting"),
            400,
            {"code": "invalid_decision", "fields": {}},
            None,
        ),
    ],
)
def test_the_handler_renders_each_domain_error(
    error: DomainError, status: int, body: dict[str, object], retry_after: str | None
) -> None:
    request = APIRequestFactory().get("/api/v1/runs/")
    response = api_exception_handler(error, {"view": None, "request": request})
    assert response is not None
    assert response.status_code == status
    assert response.data["error"]["message"] == str(error)
    assert {k: response.data["error"][k] for k in body} == body
    assert type(response.data["error"]["code"]) is str
    assert response.headers.get("Retry-After") == retry_after
