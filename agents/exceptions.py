"""Domain errors raised by agent services and translated at the edge (CLI, API, admin)."""

from rest_framework import status

from agentsite.errors import DomainError, ErrorCode

# Seconds a client should wait before submitting again when over its cap of unfinished runs.
ACTIVE_RUNS_RETRY_AFTER = 5


class AgentsError(DomainError):
    code = ErrorCode.AGENTS_ERROR


class AgentNotFound(AgentsError):
    code = ErrorCode.AGENT_NOT_FOUND
    field = "agent"


class AgentUnavailable(AgentsError):
    code = ErrorCode.AGENT_UNAVAILABLE
    field = "agent"


class InvalidRunInput(AgentsError):
    code = ErrorCode.INVALID_INPUT
    field = "input"


class RunAlreadyFinished(AgentsError):
    code = ErrorCode.RUN_ALREADY_FINISHED
    status = status.HTTP_409_CONFLICT


class RunNotRetryable(AgentsError):
    code = ErrorCode.RUN_NOT_RETRYABLE


class IdempotencyConflict(AgentsError):
    code = ErrorCode.IDEMPOTENCY_CONFLICT
    status = status.HTTP_409_CONFLICT


class SessionBusy(AgentsError):
    code = ErrorCode.SESSION_BUSY
    status = status.HTTP_409_CONFLICT
    field = "session"


class TooManyActiveRuns(AgentsError):
    code = ErrorCode.TOO_MANY_ACTIVE_RUNS
    status = status.HTTP_429_TOO_MANY_REQUESTS
    retry_after = ACTIVE_RUNS_RETRY_AFTER
