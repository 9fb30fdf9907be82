"""Grant constraints: what operators may write, and what a call must satisfy."""

from __future__ import annotations

import pytest

from tools.constraints import check, constraint_errors, host_allowed

SCHEMA = {"properties": {"amount": {}, "url": {}, "to": {}, "currency": {}, "note": {}}}


@pytest.mark.parametrize(
    ("arguments", "constraints", "problem"),
    [
        ({"amount": 100}, {"amount": {"max": 100}}, None),
        ({"amount": 100.5}, {"amount": {"max": 100}}, "amount is 100.5; the most allowed is 100"),
        ({"amount": -1}, {"amount": {"min": 0}}, "amount is -1; the least allowed is 0"),
        ({"currency": "EUR"}, {"currency": {"one_of": ["EUR", "USD"]}}, None),
        ({"currency": "BTC"}, {"currency": {"one_of": ["EUR", "USD"]}}, "must be one of EUR, USD"),
        ({"note": "ab-12"}, {"note": {"pattern": r"[a-z]+-\d+"}}, None),
        ({"note": "ab-12x"}, {"note": {"pattern": r"[a-z]+-\d+"}}, "does not match"),
        ({"note": "abcd"}, {"note": {"max_length": 3}}, "note is 4 characters"),
        ({"url": "https://docs.example.com/a"}, {"url": {"hosts": ["docs.example.com"]}}, None),
        ({"url": "https://a.b.example.org/"}, {"url": {"hosts": ["*.example.org"]}}, None),
        ({"url": "https://example.org/"}, {"url": {"hosts": ["*.example.org"]}}, "not allowed"),
        ({"url": "https://evil.com/"}, {"url": {"hosts": ["example.com"]}}, "'evil.com' is not"),
        (
            {"url": "https://example.com.evil.com/"},
            {"url": {"hosts": ["example.com"]}},
            "not allowed",
        ),
        ({"url": "ftp://example.com/"}, {"url": {"hosts": ["example.com"]}}, "http or https"),
        # A host without a port allows only the scheme's default port.
        ({"url": "https://docs.example.com:443/"}, {"url": {"hosts": ["docs.example.com"]}}, None),
        (
            {"url": "http://127.0.0.1:6379/"},
            {"url": {"hosts": ["127.0.0.1"]}},
            "port 6379 of host '127.0.0.1' is not allowed for this agent",
        ),
        (
            {"url": "https://docs.example.com:80/"},
            {"url": {"hosts": ["docs.example.com"]}},
            "port 80 of host 'docs.example.com' is not allowed",
        ),
        ({"url": "http://a.example.org:8080/"}, {"url": {"hosts": ["*.example.org:8080"]}}, None),
        ({"url": "http://127.0.0.1:6379/"}, {"url": {"hosts": ["127.0.0.1:*"]}}, None),
        ({"url": "http://[::1]:8080/"}, {"url": {"hosts": ["[::1]:8080"]}}, None),
        (
            {"url": "http://[::1]:8081/"},
            {"url": {"hosts": ["[::1]:8080"]}},
            "port 8081 of host '::1' is not allowed",
        ),
        (
            {"url": "http://docs.example.com:99999/"},
            {"url": {"hosts": ["docs.example.com:*"]}},
            "the URL cannot be fetched: not a valid URL",
        ),
        (
            {"to": ["a@example.com", "b@example.com"]},
            {"to": {"email_domains": ["example.com"]}},
            None,
        ),
        (
            {"to": ["a@example.com", "b@elsewhere.net"]},
            {"to": {"email_domains": ["example.com"]}},
            "'b@elsewhere.net' is not at an allowed domain",
        ),
        ({"to": ["a@x.com"] * 3}, {"to": {"max_length": 2}}, "to has 3 items"),
        ({}, {"amount": {"max": 1}}, None),  # absent optional argument
        ({"amount": True}, {"amount": {"max": 5}}, "amount must be a number"),
        ({"amount": "7"}, {"amount": {"max": 5}}, "amount must be a number"),
    ],
)
def test_check(arguments, constraints, problem):
    result = check(arguments, constraints)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ({"amount": {"max": "100"}}, "amount.max: a number."),
        ({"amount": {"maximum": 1}}, "amount.maximum: unknown rule"),
        ({"amont": {"max": 1}}, "'amont' is not an argument of this tool"),
        ({"amount": {}}, "amount: rules are a non-empty JSON object."),
        ({"note": {"pattern": "(["}}, "note.pattern: not a valid regular expression"),
        ({"url": {"hosts": []}}, "url.hosts: a non-empty list of host names."),
        (
            {"url": {"hosts": ["docs.example.com:99999"]}},
            "url.hosts: 'docs.example.com:99999': the port must be a number from 1 to 65535",
        ),
        (
            {"url": {"hosts": ["https://docs.example.com/"]}},
            "url.hosts: 'https://docs.example.com/': a host name with an optional :port, not a URL",
        ),
        ({"url": {"hosts": ["::1"]}}, "url.hosts: '::1': write an IPv6 address in brackets"),
        ({"url": {"hosts": [".example.com"]}}, "'.example.com': not a host name"),
        ({"currency": {"one_of": "EUR"}}, "currency.one_of: a non-empty list"),
        ({"note": {"max_length": -1}}, "note.max_length: a whole number"),
        ([1], "Constraints are a JSON object"),
    ],
)
def test_constraint_errors_name_the_problem(constraints, message):
    problems = constraint_errors(constraints, SCHEMA)
    assert any(message in p for p in problems), problems


def test_valid_constraints_have_no_errors():
    assert constraint_errors({}, SCHEMA) == []
    assert constraint_errors(None, SCHEMA) == []
    assert (
        constraint_errors(
            {
                "amount": {"min": 0, "max": 50},
                "url": {"hosts": ["*.example.com", "docs.example.org:8443", "[::1]:*"]},
            },
            SCHEMA,
        )
        == []
    )


def test_host_matching_is_exact_or_a_true_subdomain():
    assert host_allowed("API.Example.com.", ["api.example.com"])
    assert host_allowed("x.example.com", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("badexample.com", ["*.example.com"])
    assert not host_allowed("", ["*.example.com"])


def test_approve_above_escalates_rather_than_refuses():
    from tools.constraints import approval_needed

    rules = {"amount": {"max": 500, "approve_above": 50}}
    assert check({"amount": 120}, rules) is None  # within the limit: not refused
    assert approval_needed({"amount": 120}, rules) == (
        "amount is 120, above 50, which needs a reviewer's approval"
    )
    assert approval_needed({"amount": 50}, rules) == ""
    assert approval_needed({}, rules) == ""
    assert check({"amount": 600}, rules) is not None  # past max: refused outright
    assert constraint_errors({"amount": {"approve_above": "50"}}, SCHEMA) == [
        "amount.approve_above: a number."
    ]
