"""Dissolved: budgets in agents.budgets; prices, routes and quotas in agents.providers."""

# transitional: re-exported for the engine split (issue 18); removed when merged
from .budgets import Budget, budget_problem, has_cost_limit, run_budget
from .providers.base import estimate_input
from .providers.prices import cost_of, forget_prices, price_of
from .providers.routing import (
    breaker_key,
    candidate_routes,
    choose_route,
    is_routine,
    max_attempts,
    next_route,
    report,
    take_probe,
)

__all__ = [
    "Budget",
    "breaker_key",
    "budget_problem",
    "candidate_routes",
    "choose_route",
    "cost_of",
    "estimate_input",
    "forget_prices",
    "has_cost_limit",
    "is_routine",
    "max_attempts",
    "next_route",
    "price_of",
    "report",
    "run_budget",
    "take_probe",
]
