"""What a step was asked to do, typed: ``Step.request`` (jsonb) read and written through these.

A model step records the tools it offered, whether its route is the routine one, the failures
per route (for fallback) and how many times it was put off (a rate limit or an open circuit);
a tool step records its arguments and, once a reviewer decided, the approval they ran under and
what the model had proposed. ``v`` is the schema's version: rows written before it had none
(version 0, the same keys), and a reader must accept every version a live row may have.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from agents.models import Step

SCHEMA_VERSION = 1

# A value never written for an optional key (None is a value the model may send).
_ABSENT: Any = object()


def _data(step: Step) -> dict[str, Any]:
    return step.request if isinstance(step.request, dict) else {}


@dataclass(frozen=True)
class ModelStepRequest:
    tools: list[str] = field(default_factory=list)
    routine: bool = False
    # route -> {"transient": failures so far, "permanent": the error that ruled it out}
    route_failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    throttled: int = 0  # times put off without spending an attempt

    @classmethod
    def of(cls, step: Step) -> ModelStepRequest:
        data = _data(step)
        failures = data.get("route_failures")
        return cls(
            tools=list(data.get("tools") or []),
            routine=bool(data.get("routine")),
            route_failures=dict(failures) if isinstance(failures, dict) else {},
            throttled=int(data.get("throttled") or 0),
        )

    def fresh(self) -> ModelStepRequest:
        """The same request with every route's failures and deferrals forgotten."""
        return replace(self, route_failures={}, throttled=0)

    def with_failure(self, route: str, entry: dict[str, Any]) -> ModelStepRequest:
        return replace(self, route_failures={**self.route_failures, route: entry})

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"v": SCHEMA_VERSION, "tools": self.tools, "routine": self.routine}
        if self.route_failures:
            data["route_failures"] = self.route_failures
        if self.throttled:
            data["throttled"] = self.throttled
        return data


@dataclass(frozen=True)
class ToolStepRequest:
    arguments: Any = None
    approval: str = ""  # the approval it runs under (an approval-gated call)
    proposed_arguments: Any = _ABSENT  # what the model proposed, when a reviewer edited it

    @classmethod
    def of(cls, step: Step) -> ToolStepRequest:
        data = _data(step)
        return cls(
            arguments=data.get("arguments"),
            approval=str(data.get("approval") or ""),
            proposed_arguments=data.get("proposed_arguments", _ABSENT),
        )

    @property
    def edited(self) -> bool:
        return self.proposed_arguments is not _ABSENT

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"v": SCHEMA_VERSION, "arguments": self.arguments}
        if self.approval:
            data["approval"] = self.approval
        if self.edited:
            data["proposed_arguments"] = self.proposed_arguments
        return data
