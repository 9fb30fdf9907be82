"""Which model answers a step: routine, primary and fallback routes, and their circuits.

A step is answered by the first usable route among: the agent's routine route (for routine
turns), the primary (the run's route), then the fallbacks in order. A route is skipped for the
rest of the step after a non-retryable error (bad request, unknown model, a nonsense answer) or
after AGENTSITE_FALLBACK_AFTER retryable failures, and skipped while its circuit
(agentsite.breaker, key ``model:<route>``, shared by all workers) is open. The last usable route
keeps the step's remaining attempts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings

from agentsite import breaker

if TYPE_CHECKING:
    from agents.models import Run, Step


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
    """The route's circuit in agentsite.breaker; None for the built-in scripted provider (in
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
