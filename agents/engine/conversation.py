"""The conversation a model step sends: the system prompt with what the answer must look like,
the session's earlier turns, the run's input, then each model turn with its tool results."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings

from agents.models import Run, Step
from agents.providers import ModelResponse, ToolCallRequest
from tools import policy

# A session shows the model the input and result of this many of its earlier runs.
SESSION_HISTORY_RUNS = 20


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _tool_message(step: Step) -> dict[str, Any]:
    if step.status == Step.Status.SUCCEEDED:
        content = _as_text(step.response)
    elif step.status == Step.Status.REFUSED:
        content = f"Refused: {step.error}"
    else:
        content = f"Error: {step.error or step.status}"
    limit = settings.AGENTSITE_MAX_TOOL_RESULT_CHARS
    if len(content) > limit:
        content = content[:limit] + f"… [truncated, {len(content)} characters in all]"
    return {"role": "tool", "tool_call_id": step.tool_call_id, "content": content}


def _model_message(step: Step) -> dict[str, Any]:
    data = step.response or {}
    message: dict[str, Any] = {"role": "assistant", "content": data.get("text")}
    if data.get("tool_calls"):
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": call["arguments"]
                    if isinstance(call["arguments"], str)
                    else json.dumps(call["arguments"], sort_keys=True),
                },
            }
            for call in data["tool_calls"]
        ]
    return message


def _answer_instructions(version: Any) -> str:
    """What the model is told about the form of its final answer (schema, confidence)."""
    parts = []
    if version.output_schema:
        parts.append(
            "Your final answer must be only JSON matching this JSON Schema: "
            + json.dumps(version.output_schema, sort_keys=True)
        )
    if version.policy.get("min_confidence") is not None:
        parts.append(
            "With your final answer, say how sure you are: "
            + (
                'include a "confidence" property (0 to 1) in it.'
                if version.output_schema
                else 'answer with only a JSON object {"answer": <your answer>, "confidence": '
                "<0 to 1>}."
            )
        )
    return "\n".join(parts)


def build_messages(run: Run, steps: list[Step]) -> list[dict[str, Any]]:
    """The conversation the model sees: system prompt, the session's earlier turns, the input,
    then every model turn of this run followed by its tool results."""
    version = run.agent_version
    messages: list[dict[str, Any]] = []
    system = "\n\n".join(p for p in (version.system_prompt, _answer_instructions(version)) if p)
    if system:
        messages.append({"role": "system", "content": system})
    if run.session_id is not None:
        earlier = list(
            Run.objects.filter(
                session_id=run.session_id,
                status=Run.Status.SUCCEEDED,
                created_at__lt=run.created_at,
            )
            .order_by("-created_at")
            .values_list("input", "result")[:SESSION_HISTORY_RUNS]
        )
        for past_input, past_result in reversed(earlier):
            messages.append({"role": "user", "content": _as_text(past_input)})
            messages.append({"role": "assistant", "content": _as_text(past_result)})
    messages.append({"role": "user", "content": _as_text(run.input)})
    for step in steps:
        if step.kind == Step.Kind.MODEL and step.status == Step.Status.SUCCEEDED:
            messages.append(_model_message(step))
            problem = (step.response or {}).get("output_errors")
            if problem:
                messages.append(
                    {
                        "role": "user",
                        "name": "agentsite",
                        "content": f"Your answer does not match the required output schema: "
                        f"{problem}. Answer again with only JSON that matches the schema.",
                    }
                )
            messages.extend(
                _tool_message(s)
                for s in steps
                if s.kind == Step.Kind.TOOL and s.parent_index == step.index
            )
    return messages


def offered_schemas(run: Run) -> list[dict[str, Any]]:
    return [spec.openai_schema() for spec in policy.offered_tools(run)]


def stored_response(step: Step) -> ModelResponse:
    data = step.response or {}
    return ModelResponse(
        text=data.get("text"),
        tool_calls=[
            ToolCallRequest(
                id=c.get("id", ""),
                name=c.get("name", ""),
                arguments=c.get("arguments"),
                arguments_error=c.get("arguments_error", ""),
            )
            for c in data.get("tool_calls") or []
        ],
        input_tokens=0,
        output_tokens=0,
    )
