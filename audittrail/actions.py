"""What an audit event records: its ``action``. Every writer names one of these.

The values are the stored spellings and must never change: each event's action is part of the
text its seal hashes (``audittrail.chain``), and readers (metrics, the events API, the chaos
checks, operators' queries) match on them."""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    # A run's life (the engine, the reconciler, services).
    RUN_SUBMITTED = "run.submitted"
    RUN_STARTED = "run.started"
    RUN_WAITING_APPROVAL = "run.waiting_approval"
    RUN_RESUMED = "run.resumed"
    RUN_SUCCEEDED = "run.succeeded"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    RUN_RETRIED = "run.retried"
    RUN_NUDGED = "run.nudged"

    # Steps (the engine).
    STEP_SUCCEEDED = "step.succeeded"
    STEP_DISCARDED = "step.discarded"  # an answer that came after the run was cancelled
    STEP_FAILED = "step.failed"
    STEP_RETRY_SCHEDULED = "step.retry_scheduled"
    STEP_FALLBACK = "step.fallback"
    STEP_LEASE_EXPIRED = "step.lease_expired"
    # A model step put off without spending an attempt; the payload's ``reason`` says why:
    # rate_limited (our limiter), provider_429, circuit_open, circuit_probe_out. The value is
    # the spelling stored since the first reason (rate limits) and stays: see the README.
    STEP_DEFERRED = "step.rate_limited"
    OUTPUT_INVALID = "output.invalid"

    # Tool calls (the engine's tool steps).
    TOOL_CALL_REQUESTED = "tool_call.requested"
    TOOL_CALL_REFUSED = "tool_call.refused"
    TOOL_CALL_SHORT_CIRCUITED = "tool_call.short_circuited"
    TOOL_CALL_ATTEMPT = "tool_call.attempt"
    TOOL_CALL_SUCCEEDED = "tool_call.succeeded"
    TOOL_CALL_FAILED = "tool_call.failed"

    # The review queue (approvals).
    APPROVAL_REQUESTED = "approval.requested"
    APPROVAL_APPROVED = "approval.approved"
    APPROVAL_REJECTED = "approval.rejected"
    APPROVAL_EXPIRED = "approval.expired"
    APPROVAL_CANCELLED = "approval.cancelled"
    APPROVAL_ESCALATED = "approval.escalated"

    # Webhooks.
    WEBHOOK_DELIVERED = "webhook.delivered"
    WEBHOOK_FAILED = "webhook.failed"

    # Operators' changes (admin, commands).
    AGENT_VERSION_PUBLISHED = "agent.version_published"
    AGENT_CANARY_STARTED = "agent.canary_started"
    AGENT_CANARY_REPLACED = "agent.canary_replaced"
    AGENT_CANARY_PROMOTED = "agent.canary_promoted"
    AGENT_CANARY_ROLLED_BACK = "agent.canary_rolled_back"
    PROVIDER_KEY_CHANGED = "provider.key_changed"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    TOOL_ENABLED = "tool.enabled"
    TOOL_DISABLED = "tool.disabled"
    TOOL_CIRCUIT_RESET = "tool.circuit_reset"

    @classmethod
    def run_finished(cls, status: str) -> AuditAction:
        """The action of a run ending in ``status`` (succeeded, failed, cancelled)."""
        return cls(f"run.{status}")

    @classmethod
    def tool_call_ended(cls, outcome: str) -> AuditAction:
        """The action of a tool call's ``outcome`` (succeeded, failed, refused)."""
        return cls(f"tool_call.{outcome}")

    @classmethod
    def approval_decided(cls, status: str) -> AuditAction:
        """The action of a review ending in ``status`` (approved, rejected, expired, ...)."""
        return cls(f"approval.{status}")

    @classmethod
    def webhook_ended(cls, status: str) -> AuditAction:
        """The action of a webhook that was ``status`` (delivered, failed)."""
        return cls(f"webhook.{status}")


RUN_FINISHED = frozenset(
    {AuditAction.RUN_SUCCEEDED, AuditAction.RUN_FAILED, AuditAction.RUN_CANCELLED}
)
TOOL_CALL_ENDED = frozenset(
    {
        AuditAction.TOOL_CALL_SUCCEEDED,
        AuditAction.TOOL_CALL_FAILED,
        AuditAction.TOOL_CALL_REFUSED,
        AuditAction.TOOL_CALL_SHORT_CIRCUITED,
    }
)
# A review's end (an edit is an approval with ``edited`` in its payload).
APPROVAL_DECIDED = frozenset(
    {
        AuditAction.APPROVAL_APPROVED,
        AuditAction.APPROVAL_REJECTED,
        AuditAction.APPROVAL_EXPIRED,
        AuditAction.APPROVAL_CANCELLED,
    }
)
