"""Cumulative grant limits: what a tool's calls add up to over a run or a session.

Per-call rules (``max``, ``approve_above``) are beaten by splitting: ten refunds of 50 EUR each
pass ``{"max": 500, "approve_above": 50}`` one by one. A grant's constraints may therefore also
limit the calls' running totals::

    {"amount": {"max": 500, "approve_above": 50, "sum_max": 500, "approve_sum_above": 100},
     "*": {"max_calls": 5, "per": "session"}}

``sum_max``            the argument's total over the counted calls, this one included, may not
                       pass it: the call is refused (the model reads why)
``approve_sum_above``  a total above it needs a reviewer's approval, even in ``allow`` mode
``max_calls``          (under ``"*"``, the call itself) the most calls of the tool
``per``                ``"run"`` (default) or ``"session"`` (every run of the run's session;
                       a run without a session counts its own), for the rules beside it

Every call of the tool in the scope counts, parallel calls of one turn included, except those
refused (by policy, or at execution) and those a reviewer rejected; a call held for review
reserves its amount (its proposed, or edited, arguments) until it is decided. Each call is read
as the tool's schema reads it (defaults filled in, keys by alias), the stored ones as the one
being decided; a negative number adds nothing (it would make room for more). The totals are
read under the run's row lock (the engine holds it when it decides a turn's calls one after the
other; a decision on a held call holds it; the re-check before execution takes it), so two
parallel calls can never both pass. Limits (``sum_max``, ``max_calls``) count every other call;
``approve_sum_above`` counts the calls before this one (a reviewer's approval is not asked for
again because a later sibling was held). Child runs, when they exist, will count toward their
root run's totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from django.db import transaction

from agents.models import Run, Step

from .registry import registry

CALL = "*"  # the constraints key of rules about the call itself, not one argument
SUM_RULES = ("sum_max", "approve_sum_above")
CALL_RULES = ("max_calls",)
SCOPES = ("run", "session")


def is_cumulative(rules: Any) -> bool:
    return isinstance(rules, Mapping) and any(r in rules for r in (*SUM_RULES, *CALL_RULES))


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def amount(value: Any) -> Decimal | None:
    """What a call adds to an argument's total: the number, or a list's numbers summed; None
    when it is not a number (a total cannot be kept of it). A negative number adds nothing: a
    call of -1000 must not make room for ten more of 100."""
    values = value if isinstance(value, list) else [value]
    total = Decimal(0)
    for item in values:
        number = _number(item.strip() if isinstance(item, str) else item)
        if number is None:
            return None
        total += max(number, Decimal(0))
    return total


def as_validated(spec: Any, arguments: Any) -> Any:
    """A stored call's arguments as the tool ran (or will run) them: validated by its schema,
    defaults filled in, keys by alias, exactly as the call being decided is read (a default, a
    field name sent for its alias or ``true`` for an int must count in the history as they
    count now). Stored arguments that no longer validate are read as they are."""
    if spec is None or not isinstance(arguments, dict):
        return arguments
    try:
        return spec.validate(arguments).model_dump(by_alias=True)
    except Exception:
        return arguments


@dataclass
class Totals:
    """The counted calls of one tool in one scope, besides the call being decided: all of them
    (``others``), and those before it (``before``)."""

    others_calls: int = 0
    before_calls: int = 0
    others: dict[str, Decimal] = field(default_factory=dict)
    before: dict[str, Decimal] = field(default_factory=dict)


def totals(
    run: Run, tool: str, scope: str, arguments: Iterable[str], *, step_index: int | None
) -> Totals:
    """The totals of ``tool``'s counted calls in ``run``'s scope, but the call at
    ``step_index`` (the one being decided; None: not recorded yet)."""
    spec = registry.get(tool)

    steps = Step.objects.filter(kind=Step.Kind.TOOL, tool_name=tool).exclude(
        status=Step.Status.REFUSED
    )
    if scope == "session" and run.session_id is not None:
        steps = steps.filter(run__session_id=run.session_id)
    else:
        steps = steps.filter(run_id=run.pk)
    if step_index is not None:
        steps = steps.exclude(run_id=run.pk, index=step_index)
    wanted = list(arguments)
    result = Totals(others={a: Decimal(0) for a in wanted}, before={a: Decimal(0) for a in wanted})
    for run_id, index, request in steps.values_list("run_id", "index", "request").order_by():
        before = run_id != run.pk or step_index is None or index < step_index
        result.others_calls += 1
        result.before_calls += before
        called = as_validated(spec, request.get("arguments") if isinstance(request, dict) else None)
        for name in wanted:
            value = amount(called.get(name)) if isinstance(called, dict) else None
            if value is None:
                continue  # nothing (or nothing numeric) to add: the call was refused or had none
            result.others[name] += value
            if before:
                result.before[name] += value
    return result


@dataclass
class Verdict:
    refusal: str = ""
    approval_reason: str = ""


def _scope_word(scope: str, run: Run) -> str:
    return "session" if scope == "session" and run.session_id is not None else "run"


def check(
    run: Run,
    tool: str,
    arguments: Mapping[str, Any],
    rule_sets: Iterable[Mapping[str, Any]],
    *,
    step_index: int | None,
) -> Verdict:
    """Apply the cumulative rules of ``rule_sets`` (each grant's constraints) to this call of
    ``tool`` with its validated ``arguments``, the totals read under the run's lock.

    A caller inside a transaction holds that lock already (the engine deciding a turn's calls,
    a reviewer's decision); outside one (the check before execution) it is taken here, so an
    edit decided meanwhile is seen whole or not at all."""
    rule_sets = [r for r in rule_sets if any(is_cumulative(v) for v in r.values())]
    if not rule_sets:
        return Verdict()
    if transaction.get_connection().in_atomic_block:
        return _check_locked(run, tool, arguments, rule_sets, step_index=step_index)
    with transaction.atomic():
        Run.objects.select_for_update(of=("self",)).filter(pk=run.pk).order_by().exists()
        return _check_locked(run, tool, arguments, rule_sets, step_index=step_index)


def _check_locked(
    run: Run,
    tool: str,
    arguments: Mapping[str, Any],
    rule_sets: list[Mapping[str, Any]],
    *,
    step_index: int | None,
) -> Verdict:
    cache: dict[str, Totals] = {}

    def scope_totals(scope: str) -> Totals:
        if scope not in cache:
            names = {
                name
                for rule_set in rule_sets
                for name, rules in rule_set.items()
                if name != CALL and is_cumulative(rules)
            }
            cache[scope] = totals(run, tool, scope, names, step_index=step_index)
        return cache[scope]

    approval = ""
    for rule_set in rule_sets:
        for name, rules in rule_set.items():
            if not is_cumulative(rules):
                continue
            scope = str(rules.get("per") or "run")
            where = f"this {_scope_word(scope, run)}'s"
            counted = scope_totals(scope)
            if name == CALL:
                most = rules.get("max_calls")
                if most is not None and counted.others_calls + 1 > most:
                    return Verdict(
                        refusal=(
                            f"{tool} may be called at most {most} times per "
                            f"{_scope_word(scope, run)}, and {where} calls have reached it"
                        )
                    )
                continue
            if name not in arguments or arguments[name] is None:
                continue
            value = amount(arguments[name])
            if value is None:
                return Verdict(refusal=f"{name} must be a number for the grant's running total")
            limit = _number(rules.get("sum_max"))
            total = counted.others[name] + value
            if limit is not None and total > limit:
                return Verdict(
                    refusal=(
                        f"{name} {value} would bring {where} total of {tool} {name} to {total}; "
                        f"the most allowed is {limit}"
                    )
                )
            threshold = _number(rules.get("approve_sum_above"))
            running = counted.before[name] + value
            if threshold is not None and running > threshold and not approval:
                approval = (
                    f"{name} {value} brings {where} total of {tool} {name} to {running}, above "
                    f"{threshold}, which needs a reviewer's approval"
                )
    return Verdict(approval_reason=approval)
