"""Per-grant argument constraints: operator rules a call must satisfy before it executes.

A grant's ``constraints`` map a top-level argument name to rules::

    {"amount": {"max": 100}, "url": {"hosts": ["docs.example.com", "*.example.org"]}}

A rule on an argument whose value is a list applies to each element. An argument that is
absent (optional and not given) passes. Rules:

``min`` / ``max``      numbers, inclusive bounds
``one_of``             a list of allowed values
``pattern``            a regular expression the whole string must match
``max_length``         the longest string (or list) allowed
``hosts``              allowed URL hosts (http/https only); ``*.example.com`` allows subdomains
``email_domains``      allowed domains of e-mail addresses (same wildcard form)
``approve_above``      not a limit but an escalation: a number above it needs a reviewer's
                       approval even when the grant's mode is ``allow``
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

RULES = (
    "min",
    "max",
    "one_of",
    "pattern",
    "max_length",
    "hosts",
    "email_domains",
    "approve_above",
)


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
            numeric = rule in ("min", "max", "approve_above")
            if numeric and types and not types & {"number", "integer"}:
                problems.append(f"{argument}.{rule}: {argument} is not a number.")
    return problems


def _rule_errors(argument: str, rule: str, value: Any) -> list[str]:
    where = f"{argument}.{rule}"
    if rule not in RULES:
        return [f"{where}: unknown rule; use one of {', '.join(RULES)}."]
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
        host = url_host(value) if isinstance(value, str) else None
        if host is None:
            return f"{argument} must be an http or https URL"
        if not host_allowed(host, limit):
            return f"host {host!r} is not allowed for this agent (allowed: {', '.join(limit)})"
    if rule == "email_domains":
        domain = value.rpartition("@")[2] if isinstance(value, str) and "@" in value else ""
        if not host_allowed(domain, limit):
            return f"{argument} {value!r} is not at an allowed domain (allowed: {', '.join(limit)})"
    return None


def check(arguments: Mapping[str, Any], constraints: Mapping[str, Any] | None) -> str | None:
    """The first constraint the (validated) arguments break, as a message for the model."""
    for argument, rules in (constraints or {}).items():
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
            if rule == "approve_above" or (rule == "max_length" and isinstance(value, list)):
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
