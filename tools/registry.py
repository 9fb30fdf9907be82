"""The tool registry: tools are Python callables registered in code with a pydantic args model.

The JSON schema shown to the model comes from the args model, so what the model is told and what
is validated before execution are the same thing.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError


class ToolError(Exception):
    """A permanent failure of a tool call; its message is shown to the model."""


class TransientToolError(ToolError):
    """A failure worth retrying (timeout, connection error, 5xx from a dependency)."""


class ToolArgumentsInvalid(ToolError):
    """The model's arguments do not validate against the tool's args model or its grant's
    constraints."""


@functools.cache
def _parameters_schema(args_model: type[BaseModel]) -> dict[str, Any]:
    """An args model's JSON schema, built once (pydantic takes a fraction of a millisecond per
    call, and the engine shows every granted tool to the model on every turn)."""
    schema = args_model.model_json_schema()
    schema.pop("title", None)
    return schema


RISKS = ("low", "medium", "high")
MODES = ("allow", "require_approval")


@dataclass(frozen=True)
class ToolContext:
    """What a tool knows about the call it serves. ``idempotency_key`` is stable across retries
    and redeliveries of the same call: use it so an external side effect happens at most once."""

    run_id: str
    step_index: int
    idempotency_key: str
    attempt: int
    tool: str = ""
    # The argument constraints of the agent's grant (already checked against the arguments).
    constraints: Mapping[str, Any] = field(default_factory=dict)
    # Every rule set that applies (the version's grant and the current one): a tool that
    # re-applies constraints during the call (e.g. to the host a redirect points at) must
    # require all of them to pass. Empty means just ``constraints``.
    constraint_sets: tuple[Mapping[str, Any], ...] = ()

    def all_constraint_sets(self) -> tuple[Mapping[str, Any], ...]:
        return self.constraint_sets or (self.constraints,)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    args_model: type[BaseModel]
    func: Callable[[Any, ToolContext], Any]
    risk: str = "low"
    timeout: int = 30
    retries: int = 3
    # Tools that change the world record what they did in the outbox (see tools.outbox).
    side_effects: bool = False
    # The mode a new grant of this tool gets unless the operator chooses otherwise.
    default_mode: str = "allow"

    def parameters_schema(self) -> dict[str, Any]:
        return copy.deepcopy(_parameters_schema(self.args_model))

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters_schema(),
            },
        }

    def definition(self) -> dict[str, Any]:
        """What the catalogue mirrors; a change of it is a new version of the tool."""
        return {
            "description": self.description,
            "parameters": self.parameters_schema(),
            "risk": self.risk,
            "timeout": self.timeout,
            "retries": self.retries,
            "side_effects": self.side_effects,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.definition(), sort_keys=True).encode()).hexdigest()

    def validate(self, arguments: Any) -> BaseModel:
        if not isinstance(arguments, dict):
            raise ToolArgumentsInvalid(
                f"arguments for {self.name} must be a JSON object, got {type(arguments).__name__}"
            )
        try:
            return self.args_model.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ToolArgumentsInvalid(f"invalid arguments for {self.name}: {problems}") from None
        except Exception as exc:  # a validator that raised something else: still a refusal
            raise ToolArgumentsInvalid(
                f"invalid arguments for {self.name}: {type(exc).__name__}: {exc}"
            ) from None


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, ToolSpec] = {}

    def register(self, spec: ToolSpec) -> None:
        if spec.name in self._tools and self._tools[spec.name].func is not spec.func:
            raise ValueError(f"a tool named {spec.name!r} is already registered")
        self._tools[spec.name] = spec

    def get(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools


registry = ToolRegistry()


def tool(
    *,
    name: str,
    description: str,
    risk: str = "low",
    timeout: int = 30,
    retries: int = 3,
    side_effects: bool = False,
    requires_approval: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func(args: ArgsModel, ctx: ToolContext) -> JSON value`` as a tool.

    ``retries`` is how many times a transient failure (TransientToolError, a timeout, a lost
    connection) is retried with backoff; ``timeout`` is the soft time limit of one attempt (the
    hard limit adds ``AGENTSITE_TOOL_HARD_LIMIT_GRACE``). ``requires_approval`` makes new grants
    default to ``require_approval``.
    """
    if risk not in RISKS:
        raise ValueError(f"tool {name!r}: risk must be one of {', '.join(RISKS)}")
    if timeout < 1 or retries < 0:
        raise ValueError(f"tool {name!r}: timeout must be >= 1 and retries >= 0")

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        params = list(inspect.signature(func).parameters)
        try:
            hints = typing.get_type_hints(func)
        except NameError as exc:
            raise TypeError(f"tool {name!r}: cannot resolve its annotations ({exc})") from None
        args_model = hints.get(params[0]) if params else None
        if not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
            raise TypeError(
                f"tool {name!r}: first parameter must be annotated with a pydantic model"
            )
        registry.register(
            ToolSpec(
                name=name,
                description=description,
                args_model=args_model,
                func=func,
                risk=risk,
                timeout=timeout,
                retries=retries,
                side_effects=side_effects,
                default_mode="require_approval" if requires_approval else "allow",
            )
        )
        return func

    return decorator
