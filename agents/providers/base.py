"""The one small interface every model provider implements."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ModelRequest:
    model: str  # the model part of the route ("demo" in "scripted:demo")
    messages: list[dict[str, Any]]  # OpenAI chat format
    tools: list[dict[str, Any]]  # OpenAI function-tool schemas
    temperature: float = 0.0
    script: list[dict[str, Any]] = field(default_factory=list)  # scripted provider only
    attempt: int = 1


@dataclass
class ToolCallRequest:
    id: str
    name: str
    arguments: Any  # parsed JSON when valid; the raw text otherwise
    arguments_error: str = ""  # why the arguments could not be parsed, if they could not


@dataclass
class ModelResponse:
    text: str | None
    tool_calls: list[ToolCallRequest]
    input_tokens: int
    output_tokens: int
    finish_reason: str | None = None
    usage_reported: bool = True
    raw_model: str = ""

    def as_message(self) -> dict[str, Any]:
        """The assistant message to replay to the model on its next turn."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.name,
                        "arguments": call.arguments
                        if isinstance(call.arguments, str)
                        else _dumps(call.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        return message

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tool_calls": [
                {
                    "id": c.id,
                    "name": c.name,
                    "arguments": c.arguments,
                    **({"arguments_error": c.arguments_error} if c.arguments_error else {}),
                }
                for c in self.tool_calls
            ],
            "finish_reason": self.finish_reason,
            "usage_reported": self.usage_reported,
            "model": self.raw_model,
        }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class ProviderError(Exception):
    """A model call that did not produce an answer."""

    transient = False
    code = "provider_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransientProviderError(ProviderError):
    """Worth retrying: timeouts, connection errors, 429 and 5xx."""

    transient = True
    code = "provider_unavailable"


class RateLimitedProviderError(TransientProviderError):
    """The provider said 429: wait (its Retry-After, if any) and ask again; not a failure of
    the model, so it opens no circuit and spends no attempt."""

    code = "provider_rate_limited"


class PermanentProviderError(ProviderError):
    """Retrying will not help: bad request, auth, unknown model, or a nonsense answer."""

    code = "provider_error"


class InvalidProviderResponse(PermanentProviderError):
    code = "provider_invalid_response"


class ModelProvider(Protocol):
    name: str
    # The provider's own limits, kept across all workers (providers.quotas); 0: none.
    requests_per_minute: int
    tokens_per_minute: int

    def complete(self, request: ModelRequest) -> ModelResponse: ...


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for servers that report no usage."""
    return len(text) // 4 + 1 if text else 0


def estimate_input(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """The input tokens a call will be charged, roughly (4 characters a token)."""
    return estimate_tokens(json.dumps(messages)) + estimate_tokens(json.dumps(tools))
