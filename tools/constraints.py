"""Per-grant argument constraints: operator rules a call must satisfy before it executes.

A grant's ``constraints`` map a top-level argument name to rules::

    {"amount": {"max": 100}, "url": {"hosts": ["docs.example.com", "*.example.org"]}}

A rule on an argument whose value is a list applies to each element. An argument that is
absent (optional and not given) passes. Rules:

``min`` / ``max``      numbers, inclusive bounds
``one_of``             a list of allowed values
``pattern``            a regular expression the whole string must match
``max_length``         the longest string (or list) allowed
``hosts``              allowed URL hosts and ports (http/https only): ``docs.example.com`` (the
                       default port of the scheme), ``host:8080``, ``host:*`` (any port),
                       ``[2001:db8::1]:8080``; ``*.example.com`` allows subdomains
``email_domains``      allowed domains of e-mail addresses (same wildcard form)
``approve_above``      not a limit but an escalation: a number above it needs a reviewer's
                       approval even when the grant's mode is ``allow``
``sum_max``            the argument's running total over the run's (or session's) calls
``approve_sum_above``  a running total above it needs a reviewer's approval
``per``                ``run`` (default) or ``session``: where the running totals are kept
``max_calls``          under the key ``"*"`` (the call itself): the most calls per run or session

The running totals are kept by tools.cumulative (read under the run's lock); this module checks
each call on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from agentsite import outbound

from . import cumulative

RULES = (
    "min",
    "max",
    "one_of",
    "pattern",
    "max_length",
    "hosts",
    "email_domains",
    "approve_above",
    *cumulative.SUM_RULES,
    "per",
)
# Rules of the call itself, under the constraints key "*" (tools.cumulative.CALL).
CALL_RULES = (*cumulative.CALL_RULES, "per")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _schema_types(prop: Mapping[str, Any]) -> set[str]:
    types: set[str] = set()
    for option in [prop, *prop.get("anyOf", []), *prop.get("oneOf", [])]:
        kind = option.get("type") if isinstance(option, Mapping) else None
        if isinstance(kind, str):
            types.add(kind)
        elif isinstance(kind, list):
            types.update(k for k in kind if isinstance(k, str))
        items = option.get("items") if isinstance(option, Mapping) else None
        if isinstance(items, Mapping):  # a rule on a list applies to its elements
            types |= _schema_types(items)
    return types


def constraint_errors(constraints: Any, parameters_schema: Mapping[str, Any]) -> list[str]:
    """What is wrong with a grant's constraints (for the admin form); [] when they are usable."""
    if constraints in (None, {}):
        return []
    if not isinstance(constraints, dict):
        return ['Constraints are a JSON object: {"argument": {"rule": value}}.']
    properties = (parameters_schema or {}).get("properties", {})
    known = set(properties)
    problems: list[str] = []
    for argument, rules in constraints.items():
        if argument == cumulative.CALL:
            problems.extend(_call_rule_errors(rules))
            continue
        if known and argument not in known:
            problems.append(
                f"{argument!r} is not an argument of this tool (it takes: "
                f"{', '.join(sorted(known))})."
            )
            continue
        if not isinstance(rules, dict) or not rules:
            problems.append(f"{argument}: rules are a non-empty JSON object.")
            continue
        for rule, value in rules.items():
            problems.extend(_rule_errors(argument, rule, value))
            types = _schema_types(properties.get(argument) or {})
            numeric = rule in ("min", "max", "approve_above", *cumulative.SUM_RULES)
            if numeric and types and not types & {"number", "integer"}:
                problems.append(f"{argument}.{rule}: {argument} is not a number.")
        problems.extend(_per_errors(argument, rules))
    return problems


def _per_errors(where: str, rules: Mapping[str, Any]) -> list[str]:
    if "per" not in rules:
        return []
    if rules["per"] not in cumulative.SCOPES:
        return [f"{where}.per: {' or '.join(cumulative.SCOPES)}."]
    if not cumulative.is_cumulative(rules):
        return [
            f"{where}.per: says where running totals are kept; give sum_max, "
            'approve_sum_above or (under "*") max_calls with it.'
        ]
    return []


def _call_rule_errors(rules: Any) -> list[str]:
    """The rules of the call itself (``"*"``): ``max_calls`` and ``per``."""
    where = cumulative.CALL
    if not isinstance(rules, dict) or not rules:
        return [f'"{where}": rules are a non-empty JSON object, e.g. {{"max_calls": 10}}.']
    problems = [
        f'"{where}".{rule}: unknown rule for the call itself; use {", ".join(CALL_RULES)}.'
        for rule in rules
        if rule not in CALL_RULES
    ]
    most = rules.get("max_calls")
    if "max_calls" in rules and not (
        isinstance(most, int) and not isinstance(most, bool) and most >= 0
    ):
        problems.append(f'"{where}".max_calls: a whole number, 0 or more.')
    return problems + _per_errors(f'"{where}"', rules)


def _rule_errors(argument: str, rule: str, value: Any) -> list[str]:
    where = f"{argument}.{rule}"
    if rule not in RULES:
        hint = ' (max_calls goes under "*", the call itself)' if rule == "max_calls" else ""
        return [f"{where}: unknown rule; use one of {', '.join(RULES)}{hint}."]
    if rule in cumulative.SUM_RULES and not (_is_number(value) and value >= 0):
        return [f"{where}: a number, 0 or more."]
    if rule == "per":
        return []  # checked with the rules beside it (_per_errors)
    if rule in ("min", "max", "approve_above") and not _is_number(value):
        return [f"{where}: a number."]
    if rule == "max_length" and not (isinstance(value, int) and value >= 0):
        return [f"{where}: a whole number, 0 or more."]
    if rule == "one_of" and not (isinstance(value, list) and value):
        return [f"{where}: a non-empty list of allowed values."]
    if rule == "pattern":
        if not isinstance(value, str):
            return [f"{where}: a regular expression (a string)."]
        try:
            re.compile(value)
        except re.error as exc:
            return [f"{where}: not a valid regular expression ({exc})."]
    if rule in ("hosts", "email_domains") and not (
        isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
    ):
        return [f"{where}: a non-empty list of host names."]
    if rule == "hosts":
        problems = []
        for entry in value:
            try:
                outbound.parse_host_pattern(entry, wildcard="*.")
            except ValueError as exc:
                problems.append(f"{where}: {entry!r}: {exc}.")
        return problems
    return []


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """``host`` equals an entry, or is a subdomain of a ``*.domain`` entry (case-insensitive)."""
    host = host.lower().rstrip(".")
    if not host:
        return False
    for entry in allowed:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def url_host(url: str) -> str | None:
    """The host of an http(s) URL, or None when it is not one."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname


def url_not_allowed(url: str, allowed: Iterable[str]) -> str | None:
    """Why the http(s) ``url`` is not allowed by a ``hosts`` allowlist, or None if it is."""
    try:
        where = outbound.destination(url)
    except ValueError as exc:
        return f"the URL cannot be fetched: {exc}"
    entries = [allowed] if isinstance(allowed, str) else [str(entry) for entry in allowed]
    refused = outbound.refusal_by_allowlist(where, outbound.host_patterns(entries, wildcard="*."))
    listed = ", ".join(entries)
    if refused == "port":
        return (
            f"port {where.port} of host {where.host!r} is not allowed for this agent (allowed: "
            f"{listed}; a host without a port allows only the default port, 80 for http and "
            "443 for https)"
        )
    if refused == "host":
        return f"host {where.host!r} is not allowed for this agent (allowed: {listed})"
    return None


def _check_value(argument: str, rule: str, limit: Any, value: Any) -> str | None:
    if rule in ("min", "max") and not _is_number(value):
        # A rule the value cannot be checked against refuses the call; it never waves it by.
        return f"{argument} must be a number for the grant's {rule} of {limit}"
    if rule in ("pattern", "hosts", "email_domains") and not isinstance(value, str):
        value = str(value)  # e.g. a URL or address type of the tool's args model
    if rule == "min" and value < limit:
        return f"{argument} is {value}; the least allowed is {limit}"
    if rule == "max" and value > limit:
        return f"{argument} is {value}; the most allowed is {limit}"
    if rule == "one_of" and value not in limit:
        return f"{argument} must be one of {', '.join(map(str, limit))}"
    if rule == "pattern" and not (isinstance(value, str) and re.fullmatch(limit, value)):
        return f"{argument} does not match the allowed pattern {limit}"
    if rule == "max_length" and isinstance(value, str) and len(value) > limit:
        return f"{argument} is {len(value)} characters; the most allowed is {limit}"
    if rule == "hosts":
        if not isinstance(value, str) or url_host(value) is None:
            return f"{argument} must be an http or https URL"
        return url_not_allowed(value, limit)
    if rule == "email_domains":
        domain = value.rpartition("@")[2] if isinstance(value, str) and "@" in value else ""
        if not host_allowed(domain, limit):
            return f"{argument} {value!r} is not at an allowed domain (allowed: {', '.join(limit)})"
    return None


# Rules that are not checked against each value here: escalations, and the running totals
# (tools.cumulative).
_NOT_PER_VALUE = ("approve_above", *cumulative.SUM_RULES, "per")


def check(arguments: Mapping[str, Any], constraints: Mapping[str, Any] | None) -> str | None:
    """The first constraint the (validated) arguments break, as a message for the model."""
    for argument, rules in (constraints or {}).items():
        if argument == cumulative.CALL or not isinstance(rules, Mapping):
            continue
        if argument not in arguments or arguments[argument] is None:
            continue
        value = arguments[argument]
        if isinstance(value, list):
            if "max_length" in rules and len(value) > rules["max_length"]:
                most = rules["max_length"]
                return f"{argument} has {len(value)} items; the most allowed is {most}"
            values = value
        else:
            values = [value]
        for rule, limit in rules.items():
            if rule in _NOT_PER_VALUE or (rule == "max_length" and isinstance(value, list)):
                continue
            for item in values:
                problem = _check_value(argument, rule, limit, item)
                if problem:
                    return problem
    return None


def approval_needed(arguments: Mapping[str, Any], constraints: Mapping[str, Any] | None) -> str:
    """Why the call needs a reviewer under the grant's ``approve_above`` rules, or ""."""
    for argument, rules in (constraints or {}).items():
        limit = rules.get("approve_above") if isinstance(rules, dict) else None
        value = arguments.get(argument)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if limit is not None and _is_number(item) and item > limit:
                return f"{argument} is {item}, above {limit}, which needs a reviewer's approval"
    return ""
