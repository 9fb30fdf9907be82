"""The circuit breaker moved to agentsite.breaker (tools and model routes share it)."""

# transitional: re-exported for the engine split (issue 18); removed when merged
from agentsite.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerState,
    all_states,
    before_call,
    record_failure,
    record_success,
    reset,
    status,
)

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BreakerState",
    "all_states",
    "before_call",
    "record_failure",
    "record_success",
    "reset",
    "status",
]
