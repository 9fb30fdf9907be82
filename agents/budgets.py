"""What a run may spend: its budget (steps, tokens, cost, wall time) and the check before
every model call.

A version's limits (``AgentVersion.budget()``), which a client may tighten per run at
submission (never loosen: the operator's figure is the ceiling), are frozen on the run
(``Run.budget``). The engine checks them before every model call, against what the run has
used plus the call's estimated input (its output is unknown until it answers, so a run may pass
its output or cost limit by at most one answer). A budget escalation a reviewer approves
multiplies every limit by the number of budgets granted.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from .exceptions import InvalidRunInput
from .providers.prices import CENT_MILLIONTHS, MILLION, money, price_of

if TYPE_CHECKING:
    from .models import AgentVersion, Run


BUDGET_KEYS = (
    "max_steps",
    "max_tokens",
    "max_input_tokens",
    "max_output_tokens",
    "max_cost",
    "max_wall_seconds",
)


def _limit(name: str, value: Any) -> Decimal:
    """A budget figure as a non-negative Decimal (whole for everything but cost)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise InvalidRunInput(f"{name} must be a number", field=f"budget.{name}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise InvalidRunInput(f"{name} must be a number", field=f"budget.{name}") from None
    if not number.is_finite() or number < 0:
        raise InvalidRunInput(f"{name} must be 0 or more", field=f"budget.{name}")
    if name != "max_cost" and number != number.to_integral_value():
        raise InvalidRunInput(f"{name} must be a whole number", field=f"budget.{name}")
    if name == "max_cost" and number > Decimal("999999.999999"):
        raise InvalidRunInput(f"{name} is at most 999999.999999", field=f"budget.{name}")
    if name != "max_cost" and number > 2**31 - 1:
        raise InvalidRunInput(f"{name} is at most {2**31 - 1}", field=f"budget.{name}")
    return number


def run_budget(
    version: AgentVersion, override: Any = None, *, clamp: bool = False
) -> dict[str, Any]:
    """The budget a new run gets: the version's, tightened by the client's ``override``.

    A limit may only be lowered (or set where the version has none); raising one, or an unknown
    key, is refused with the field named. With ``clamp`` (a canary version picked after the
    override was checked against the current one), a limit above the version's is lowered to
    it instead."""
    budget = version.budget()
    if override is None:
        return budget
    if not isinstance(override, dict):
        raise InvalidRunInput("budget must be a JSON object", field="budget")
    unknown = sorted(set(override) - set(BUDGET_KEYS))
    if unknown:
        raise InvalidRunInput(
            f"unknown budget keys: {', '.join(map(str, unknown))} (known: "
            f"{', '.join(BUDGET_KEYS)})",
            field="budget",
        )
    for name, value in override.items():
        wanted = _limit(name, value)
        if name == "max_cost":
            wanted = wanted.quantize(CENT_MILLIONTHS)
            if wanted == 0 and _limit(name, value) > 0:
                raise InvalidRunInput(
                    "max_cost is at least 0.000001 (0 means no limit)", field="budget.max_cost"
                )
        ceiling = Decimal(str(budget[name]))
        if wanted == 0 and name == "max_steps":
            raise InvalidRunInput("max_steps must be at least 1", field="budget.max_steps")
        if wanted == 0:
            if ceiling and not clamp:
                raise InvalidRunInput(
                    f"{name} may not be lifted: the agent's limit is {budget[name]}",
                    field=f"budget.{name}",
                )
            continue
        if ceiling and wanted > ceiling and clamp:
            wanted = ceiling
        elif ceiling and wanted > ceiling:
            raise InvalidRunInput(
                f"{name} may not exceed the agent's limit of {budget[name]}",
                field=f"budget.{name}",
            )
        budget[name] = f"{wanted:.6f}" if name == "max_cost" else int(wanted)
    return budget


@dataclass(frozen=True)
class Budget:
    """A run's limits as the engine applies them now (0 means no limit)."""

    max_steps: int
    max_tokens: int
    max_input_tokens: int
    max_output_tokens: int
    max_cost: Decimal
    max_wall_seconds: int

    @classmethod
    def of(cls, run: Run, allowance: int) -> Budget:
        raw = {**run.agent_version.budget(), **(run.budget or {})}
        return cls(
            max_steps=int(raw["max_steps"]) * allowance,
            max_tokens=int(raw["max_tokens"]) * allowance,
            max_input_tokens=int(raw["max_input_tokens"]) * allowance,
            max_output_tokens=int(raw["max_output_tokens"]) * allowance,
            max_cost=Decimal(str(raw["max_cost"])) * allowance,
            max_wall_seconds=int(raw["max_wall_seconds"]) * allowance,
        )


def budget_problem(
    run: Run, budget: Budget, *, steps: int, estimate: int, route: str, elapsed: float
) -> str:
    """Why the run may not make its next model call (``estimate`` input tokens on ``route``,
    ``steps`` steps so far, ``elapsed`` seconds since it started), or ""."""
    if steps >= budget.max_steps:
        return f"the run reached its limit of {budget.max_steps} steps"
    used = run.input_tokens + run.output_tokens
    if budget.max_tokens and used + estimate > budget.max_tokens:
        return (
            f"the run used {used} tokens and the next call needs about {estimate} more; its "
            f"limit is {budget.max_tokens}"
        )
    if budget.max_input_tokens and run.input_tokens + estimate > budget.max_input_tokens:
        return (
            f"the run used {run.input_tokens} input tokens and the next call needs about "
            f"{estimate} more; its limit is {budget.max_input_tokens}"
        )
    if budget.max_output_tokens and run.output_tokens >= budget.max_output_tokens:
        return (
            f"the run used {run.output_tokens} output tokens; its limit is "
            f"{budget.max_output_tokens}"
        )
    if budget.max_cost:
        price = price_of(route)
        if price is None:
            return (
                f"the run has a cost limit but model {route!r} has no price (add one in the "
                "admin's model prices or AGENTSITE_MODEL_PRICES)"
            )
        next_cost = money(estimate * price[0] / MILLION)
        if run.cost + next_cost > budget.max_cost:
            return (
                f"the run cost {run.cost} and the next call about {next_cost} more; its limit "
                f"is {budget.max_cost}"
            )
    if budget.max_wall_seconds and elapsed >= budget.max_wall_seconds:
        return f"the run has been going {int(elapsed)} s; its limit is {budget.max_wall_seconds} s"
    return ""


def has_cost_limit(run: Run) -> bool:
    """Whether the run has a cost limit (then it may not call a model that has no price)."""
    raw = {**run.agent_version.budget(), **(run.budget or {})}
    return Decimal(str(raw["max_cost"])) > 0
