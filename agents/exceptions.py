"""Domain errors raised by agent services and translated at the edge (CLI, API, admin)."""


class AgentsError(Exception):
    code = "agents_error"


class AgentNotFound(AgentsError):
    code = "agent_not_found"


class AgentUnavailable(AgentsError):
    code = "agent_unavailable"


class InvalidRunInput(AgentsError):
    code = "invalid_input"

    def __init__(self, message: str, *, field: str = "input") -> None:
        super().__init__(message)
        self.field = field


class RunAlreadyFinished(AgentsError):
    code = "run_already_finished"


class RunNotRetryable(AgentsError):
    code = "run_not_retryable"


class IdempotencyConflict(AgentsError):
    code = "idempotency_conflict"


class SessionBusy(AgentsError):
    code = "session_busy"


class TooManyActiveRuns(AgentsError):
    code = "too_many_active_runs"
