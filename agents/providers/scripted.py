"""The scripted provider: deterministic turns configured on the agent, for demos and tests.

A script is a list of turns. The turn played is the number of assistant messages since the last
user message, so the provider keeps no state and a retried or redelivered call answers the same.

    [{"tool_calls": [{"name": "knowledge_search", "arguments": {"query": "{input}"}}]},
     {"text": "Here is what I found: {last_tool_result}"}]

Templates: ``{input}`` (the last user message), ``{last_tool_result}``, ``{tool_results}``.
Past the end of the script, its last turn repeats. A turn may carry
``"fail": "transient"|"permanent"`` with ``"fail_attempts": N`` to fail its first N attempts,
which is how tests exercise retries without a network.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .base import (
    ModelRequest,
    ModelResponse,
    PermanentProviderError,
    ToolCallRequest,
    TransientProviderError,
    estimate_tokens,
)


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return json.dumps(content)


_PLACEHOLDER = re.compile(r"\{(input|last_tool_result|tool_results)\}")


def _fill(template: Any, values: dict[str, str]) -> Any:
    if isinstance(template, str):
        # One pass, so a placeholder inside the user's input is left as the user wrote it.
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    if isinstance(template, list):
        return [_fill(item, values) for item in template]
    if isinstance(template, dict):
        return {key: _fill(value, values) for key, value in template.items()}
    return template


class ScriptedProvider:
    name = "scripted"
    requests_per_minute = 0  # in process: nothing to protect
    tokens_per_minute = 0

    def complete(self, request: ModelRequest) -> ModelResponse:
        messages = request.messages
        # The run's own input starts the script; notes the engine adds (a repair request,
        # named "agentsite") continue it.
        last_user = max(
            (
                i
                for i, m in enumerate(messages)
                if m.get("role") == "user" and m.get("name") != "agentsite"
            ),
            default=-1,
        )
        turn = sum(1 for m in messages[last_user + 1 :] if m.get("role") == "assistant")
        last_assistant = max(
            (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1
        )
        tool_results = [
            _text_of(m.get("content"))
            for m in messages[last_assistant + 1 :]
            if m.get("role") == "tool"
        ]
        values = {
            "input": _text_of(messages[last_user].get("content")) if last_user >= 0 else "",
            "last_tool_result": tool_results[-1] if tool_results else "",
            "tool_results": "; ".join(tool_results),
        }
        script = request.script
        if not script:
            spec: dict[str, Any] = {"text": "You said: {input}"}
        else:
            # Past the end, the last turn repeats: a script can model a model that loops.
            spec = script[min(turn, len(script) - 1)]
        if not isinstance(spec, dict):
            raise PermanentProviderError(f"script turn {turn + 1} is not an object")

        fail = spec.get("fail")
        if fail and request.attempt <= int(spec.get("fail_attempts", 1)):
            message = spec.get("message", f"scripted {fail} failure")
            if fail == "transient":
                raise TransientProviderError(message)
            raise PermanentProviderError(message)

        prompt_tokens = sum(estimate_tokens(_text_of(m.get("content"))) for m in messages)
        if spec.get("tool_calls"):
            calls = [
                ToolCallRequest(
                    id=f"call_{turn}_{i}",
                    name=str(call.get("name", "")),
                    arguments=_fill(call.get("arguments", {}), values),
                )
                for i, call in enumerate(spec["tool_calls"])
            ]
            return ModelResponse(
                text=None,
                tool_calls=calls,
                input_tokens=prompt_tokens,
                output_tokens=sum(estimate_tokens(json.dumps(c.arguments)) for c in calls),
                finish_reason="tool_calls",
                raw_model=f"scripted:{request.model}",
            )
        text = _fill(str(spec.get("text", "")), values)
        return ModelResponse(
            text=text,
            tool_calls=[],
            input_tokens=prompt_tokens,
            output_tokens=estimate_tokens(text),
            finish_reason="stop",
            raw_model=f"scripted:{request.model}",
        )
