"""What a run may spend and which model answers its steps: budgets, prices and model routes.

Budgets
    A version's limits (``AgentVersion.budget()``), which a client may tighten per run at
    submission (never loosen: the operator's figure is the ceiling), are frozen on the run
    (``Run.budget``). The engine checks them before every model call, against what the run has
    used plus the call's estimated input (its output is unknown until it answers, so a run may
    pass its output or cost limit by at most one answer). A budget escalation a reviewer
    approves multiplies every limit by the number of budgets granted.

Prices
    ``ModelPrice`` rows (admin) per route, then ``provider:*`` rows, then
    AGENTSITE_MODEL_PRICES from the environment; per million input and output tokens. A run
    with a cost limit refuses to call a model with no price (it could not keep the limit).

Routes
    A step is answered by the first usable route among: the agent's routine route (for routine
    turns), the primary (the run's route), then the fallbacks in order. A route is skipped for
    the rest of the step after a non-retryable error (bad request, unknown model, a nonsense
    answer) or after AGENTSITE_FALLBACK_AFTER retryable failures, and skipped while its
    circuit (tools.breaker, key ``model:<route>``, shared by all workers) is open. The last
    usable route keeps the step's remaining attempts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from django.conf import settings

from tools import breaker

from .exceptions import InvalidRunInput
from .models import ModelPrice
from .providers.base import estimate_tokens

if TYPE_CHECKING:
    from .models import AgentVersion, Run, Step

BUDGET_KEYS = (
    "max_steps",
    "max_tokens",
    "max_input_tokens",
    "max_output_tokens",
    "max_cost",
    "max_wall_seconds",
)
MILLION = Decimal(1_000_000)
CENT_MILLIONTHS = Decimal("0.000001")


# --- Budgets ------------------------------------------------------------------------------------


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
        next_cost = _money(estimate * price[0] / MILLION)
        if run.cost + next_cost > budget.max_cost:
            return (
                f"the run cost {run.cost} and the next call about {next_cost} more; its limit "
                f"is {budget.max_cost}"
            )
    if budget.max_wall_seconds and elapsed >= budget.max_wall_seconds:
        return f"the run has been going {int(elapsed)} s; its limit is {budget.max_wall_seconds} s"
    return ""


def estimate_input(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """The input tokens a call will be charged, roughly (4 characters a token)."""
    return estimate_tokens(json.dumps(messages)) + estimate_tokens(json.dumps(tools))


# --- Prices -------------------------------------------------------------------------------------

_PRICE_TTL = 10.0  # seconds an edit in the admin takes to reach every worker
_prices_lock = threading.Lock()
_prices: tuple[float, dict[str, tuple[Decimal, Decimal]]] = (0.0, {})


def _table() -> dict[str, tuple[Decimal, Decimal]]:
    global _prices
    with _prices_lock:
        loaded_at, table = _prices
        if time.monotonic() - loaded_at < _PRICE_TTL:
            return table
    table = dict(settings.AGENTSITE_MODEL_PRICES)
    for row in ModelPrice.objects.all():
        table[row.route] = (row.input_per_million, row.output_per_million)
    with _prices_lock:
        _prices = (time.monotonic(), table)
    return table


def forget_prices() -> None:
    """Drop this process's cached price table (after an edit, and in tests)."""
    global _prices
    with _prices_lock:
        _prices = (0.0, {})


def price_of(route: str) -> tuple[Decimal, Decimal] | None:
    """(input, output) per million tokens for ``route``, or None if it has no price."""
    table = _table()
    provider = route.partition(":")[0]
    return table.get(route) or table.get(f"{provider}:*")


def _money(value: Decimal) -> Decimal:
    return value.quantize(CENT_MILLIONTHS, rounding=ROUND_HALF_UP)


def cost_of(route: str, input_tokens: int, output_tokens: int) -> Decimal | None:
    """What a call cost, or None when the route has no price."""
    price = price_of(route)
    if price is None:
        return None
    return _money((input_tokens * price[0] + output_tokens * price[1]) / MILLION)


# --- Routes -------------------------------------------------------------------------------------


def is_routine(run: Run, steps: list[Step]) -> bool:
    """Whether the model turn about to be taken is one the agent's routine route may answer:
    with ``routine_steps = after_tools``, a turn that reads tool results (not the first turn,
    and not a repair turn after an invalid answer)."""
    version = run.agent_version
    if not version.routine_route or version.routine_steps != "after_tools":
        return False
    last = steps[-1] if steps else None
    return last is not None and last.kind == "tool"


def candidate_routes(run: Run, *, routine: bool) -> list[str]:
    """The routes a model step may use, in order of preference."""
    version = run.agent_version
    routes = [version.routine_route] if routine and version.routine_route else []
    routes.append(run.model_route)
    routes.extend(r for r in version.fallback_routes or [] if isinstance(r, str))
    return list(dict.fromkeys(routes))  # in order, each once


def max_attempts(run: Run) -> int:
    """A step's attempts: the usual number, plus what each fallback may spend."""
    extra = len(candidate_routes(run, routine=True)) - 1
    return settings.AGENTSITE_STEP_MAX_ATTEMPTS + extra * settings.AGENTSITE_FALLBACK_AFTER


def breaker_key(route: str) -> str | None:
    """The route's circuit in tools.breaker; None for the built-in scripted provider (in
    process, deterministic: there is no remote failure to stop hammering)."""
    return None if route.startswith("scripted:") else f"model:{route}"


def report(route: str, *, ok: bool) -> None:
    """Tell the route's circuit how a call went."""
    key = breaker_key(route)
    if key is None:
        return
    if ok:
        breaker.record_success(key)
    else:
        breaker.record_failure(key)


@dataclass(frozen=True)
class RouteChoice:
    route: str | None  # None: every usable route's circuit is open
    skipped: dict[str, str]  # route -> why it was passed over
    retry_in: float = 0.0  # when route is None: until a circuit lets a probe through
    exhausted: bool = False  # every route failed for good on this step
    probe: bool = False  # the route's circuit is half-open: take its probe right before calling


def _circuit(route: str) -> tuple[bool, bool, float, str]:
    """(usable, needs the probe, seconds until usable, state) of the route's circuit, read
    without taking the probe (taken only right before the call: see take_probe)."""
    key = breaker_key(route)
    if key is None:
        return True, False, 0.0, breaker.CLOSED
    state = breaker.status(key)
    if state.state == breaker.CLOSED:
        return True, False, 0.0, state.state
    if state.state == breaker.HALF_OPEN and state.retry_in <= 0:
        return True, True, 0.0, state.state
    return False, False, state.retry_in, state.state


def take_probe(route: str) -> float | None:
    """Take the half-open circuit's probe for this call: None if taken, else the seconds until
    another may be (another worker took it first)."""
    key = breaker_key(route)
    state = breaker.before_call(key) if key is not None else None
    if state is None or state.allowed:
        return None
    return max(state.retry_in, 1.0)


def choose_route(routes: list[str], failures: dict[str, Any]) -> RouteChoice:
    """The route this attempt uses. ``failures`` is the step's record, per route, of
    ``{"transient": n, "permanent": "error"}``. A route that has had its share of retryable
    failures on this step is passed over for the next one, but used again when every other
    route's circuit is open."""
    skipped: dict[str, str] = {}
    usable = [r for r in routes if not (failures.get(r) or {}).get("permanent")]
    for route in routes:
        if route not in usable:
            skipped[route] = "it failed for good on this step"
    if not usable:
        return RouteChoice(None, skipped, exhausted=True)
    waits: list[float] = []
    tired: list[str] = []
    for position, route in enumerate(usable):
        last = position == len(usable) - 1
        transient = int((failures.get(route) or {}).get("transient", 0))
        if not last and transient >= settings.AGENTSITE_FALLBACK_AFTER:
            skipped[route] = f"it failed {transient} times on this step"
            tired.append(route)
            continue
        ok, probe, wait, state = _circuit(route)
        if not ok:
            skipped[route] = f"its circuit is {state.replace('_', '-')}"
            waits.append(wait)
            continue
        return RouteChoice(route, skipped, probe=probe)
    for route in tired:
        ok, probe, wait, _ = _circuit(route)
        if ok:
            return RouteChoice(route, skipped, probe=probe)
    return RouteChoice(None, skipped, retry_in=max(1.0, min(waits, default=1.0)))


def next_route(routes: list[str], failures: dict[str, Any], after: str) -> str | None:
    """The route the step moves to after ``after`` failed, in order, or None."""
    usable = [r for r in routes if not (failures.get(r) or {}).get("permanent")]
    later = usable[usable.index(after) + 1 :] if after in usable else usable
    for route in later:
        transient = int((failures.get(route) or {}).get("transient", 0))
        if transient < settings.AGENTSITE_FALLBACK_AFTER or route == usable[-1]:
            return route
    return None


def has_cost_limit(run: Run) -> bool:
    raw = {**run.agent_version.budget(), **(run.budget or {})}
    return Decimal(str(raw["max_cost"])) > 0
