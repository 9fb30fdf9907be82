"""Refused decisions, raised by approvals.services and rendered by agentsite.errors' handler."""

from rest_framework import status

from agentsite.errors import DomainError, ErrorCode


class DecisionError(DomainError):
    """A decision that cannot be taken; ``field`` names the input at fault, if any."""

    code = ErrorCode.INVALID_DECISION


class AlreadyDecided(DecisionError):
    code = ErrorCode.ALREADY_DECIDED
    status = status.HTTP_409_CONFLICT


class ApprovalNotFound(DecisionError):
    code = ErrorCode.NOT_FOUND
    status = status.HTTP_404_NOT_FOUND


class NotAllowedToDecide(DecisionError):
    code = ErrorCode.FORBIDDEN
    status = status.HTTP_403_FORBIDDEN
