"""Why a run ended without succeeding: ``Run.error_code`` (and ``error.code`` in the API).

The values are stored on runs and returned to clients: they never change."""

from __future__ import annotations

from enum import StrEnum


class RunErrorCode(StrEnum):
    # The engine.
    BUDGET_EXCEEDED = "budget_exceeded"
    TOO_MANY_REFUSALS = "too_many_refusals"
    WORKER_LOST = "worker_lost"
    INTERNAL_ERROR = "internal_error"
    # A model call that failed for good (agents.providers' errors carry these codes).
    PROVIDER_ERROR = "provider_error"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    PROVIDER_INVALID_RESPONSE = "provider_invalid_response"
    # A reviewer (approvals).
    REJECTED_BY_REVIEWER = "rejected_by_reviewer"
    REVIEW_EXPIRED = "review_expired"
    # A client or operator.
    CANCELLED = "cancelled"
