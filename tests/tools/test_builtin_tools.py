"""The built-in tools: the safe calculator and the knowledge search."""

from __future__ import annotations

import pytest

from tools.builtin import CalculatorArgs, SearchKnowledgeArgs, calculator, search_knowledge
from tools.models import KnowledgeArticle
from tools.registry import ToolArgumentsInvalid, ToolContext, ToolError, registry

CTX = ToolContext(run_id="run", step_index=1, idempotency_key="run:1", attempt=1)


def calc(expression: str):
    return calculator(CalculatorArgs(expression=expression), CTX)["result"]


# --- calculator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("2**3**2", 512),  # right-associative
        ("10-4-3", 3),  # left-associative
        ("(3 + 4) * 2 / 7", 2),
        ("10//3", 3),
        ("10 % 3", 1),
        ("-3**2", -9),
        ("-(2+3)", -5),
        ("--3", 3),
        ("+5", 5),
        ("2*-3", -6),
        ("1 +\t1  ", 2),
    ],
)
def test_calculator_arithmetic_and_precedence(expression, expected):
    result = calc(expression)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("7/2", 3.5), ("0.1+0.2", 0.30000000000000004), ("2**0.5", 2**0.5), ("1.5*3", 4.5)],
)
def test_calculator_floats(expression, expected):
    result = calc(expression)
    assert result == pytest.approx(expected)
    assert type(result) is float


@pytest.mark.parametrize(("expression", "expected"), [("84/2", 42), ("1.5*2", 3), ("9/3", 3)])
def test_whole_float_results_are_integers(expression, expected):
    result = calc(expression)
    assert result == expected and type(result) is int


def test_the_calculator_echoes_its_expression():
    assert calculator(CalculatorArgs(expression="6*7"), CTX) == {"expression": "6*7", "result": 42}


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1/0", "division by zero"),
        ("1//0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0**-1", "division by zero"),
        ("2**1000", "exponent too large"),
        ("10**10**10", "exponent too large"),
        ("9999999**2", "exponent too large"),
        ("10**100*10", "result out of range"),
        ("x", "unsupported expression element: Name"),
        ("__import__('os')", "unsupported expression element: Call"),
        ("__import__('os').system('false')", "unsupported expression element: Call"),
        ("abs(-1)", "unsupported expression element: Call"),
        ("(1).real", "unsupported expression element: Attribute"),
        ("'a' * 3", "unsupported expression element: Constant"),
        ("'abc'", "unsupported expression element: Constant"),
        ("True", "booleans are not numbers here"),
        ("1 + False", "booleans are not numbers here"),
        ("None", "unsupported expression element: Constant"),
        ("1 < 2", "unsupported expression element: Compare"),
        ("1 << 100000", "unsupported expression element: BinOp"),
        ("~1", "unsupported expression element: UnaryOp"),
        ("not 1", "unsupported expression element: UnaryOp"),
        ("[1, 2]", "unsupported expression element: List"),
        ("lambda: 1", "unsupported expression element: Lambda"),
        ("1j", "unsupported expression element: Constant"),
        ("1+", "not an arithmetic expression: '1+'"),
        ("import os", "not an arithmetic expression"),
        ("x = 1", "not an arithmetic expression"),
        ("", "not an arithmetic expression"),
        ("1\x00", "not an arithmetic expression"),
    ],
)
def test_calculator_refuses_with_a_clear_tool_error(expression, message):
    with pytest.raises(ToolError) as info:
        calc(expression)
    assert type(info.value) is ToolError  # a permanent error, reported to the model
    assert message in str(info.value)


def test_the_calculator_never_evaluates_names(monkeypatch):
    import builtins

    calls = []
    monkeypatch.setattr(builtins, "agentsite_sentinel", lambda: calls.append(1), raising=False)
    for expression in ("agentsite_sentinel()", "agentsite_sentinel", "(agentsite_sentinel)()"):
        with pytest.raises(ToolError, match="unsupported expression element"):
            calc(expression)
    assert calls == []


def test_leading_whitespace_is_accepted():
    assert calc("  6*7") == 42


def test_a_float_power_that_overflows_is_a_tool_error():
    with pytest.raises(ToolError, match="out of range"):
        calc("1e6**100")


@pytest.mark.parametrize("expression", ["1e999", "1e999 - 1e999", "-1e999"])
def test_non_finite_results_are_tool_errors(expression):
    with pytest.raises(ToolError):
        calc(expression)


def test_the_expression_length_limit_is_enforced_by_the_args_model():
    spec = registry.get("calculator")
    assert spec is not None
    assert spec.validate({"expression": "1" * 200}).expression == "1" * 200
    with pytest.raises(ToolArgumentsInvalid) as info:
        spec.validate({"expression": "1+" * 100 + "1"})
    assert "invalid arguments for calculator" in str(info.value)
    assert "expression" in str(info.value) and "200" in str(info.value)


def test_missing_or_mistyped_calculator_arguments_name_the_field():
    spec = registry.get("calculator")
    with pytest.raises(ToolArgumentsInvalid, match="expression: Field required"):
        spec.validate({})
    with pytest.raises(ToolArgumentsInvalid, match="expression: Input should be a valid string"):
        spec.validate({"expression": 42})


# --- search_knowledge ------------------------------------------------------------------------


def search(query: str, **fields):
    return search_knowledge(SearchKnowledgeArgs(query=query, **fields), CTX)


def titles(result) -> list[str]:
    return [article["title"] for article in result["articles"]]


@pytest.fixture
def articles(db):
    KnowledgeArticle.objects.create(
        title="Shipping times",
        body="Orders ship in two days. A refund is possible if a parcel is lost.",
        tags="shipping,delivery",
    )
    KnowledgeArticle.objects.create(
        title="Refund policy",
        body="You can ask for your money back within 30 days.",
        tags="billing",
    )
    KnowledgeArticle.objects.create(
        title="Money back guarantee",
        body="Unhappy? We return the full price.",
        tags="refund,billing",
    )
    KnowledgeArticle.objects.create(
        title="Password reset",
        body="Use the 'forgot password' link on the login page.",
        tags="account,login",
    )


def test_title_and_tag_matches_rank_above_body_only_matches(articles):
    result = search("refund")
    # Title and tag matches score the same and are ordered by title; the body-only match is last.
    assert titles(result) == ["Money back guarantee", "Refund policy", "Shipping times"]
    assert result["query"] == "refund"


def test_a_plural_matches_the_singular(articles):
    assert titles(search("refunds")) == titles(search("refund"))
    assert "Refund policy" in titles(search("REFUNDS"))


def test_more_matching_words_rank_higher(articles):
    # Money back guarantee: 3 heading words (9); Refund policy: 1 heading + 2 body words (5).
    assert titles(search("money back refund")) == [
        "Money back guarantee",
        "Refund policy",
        "Shipping times",
    ]


def test_the_limit_argument(articles):
    assert titles(search("refund", limit=1)) == ["Money back guarantee"]
    assert len(search("refund", limit=2)["articles"]) == 2
    assert len(search("refund")["articles"]) == 3  # the default limit is 3


def test_the_limit_is_validated():
    spec = registry.get("search_knowledge")
    with pytest.raises(ToolArgumentsInvalid, match="limit"):
        spec.validate({"query": "x", "limit": 0})
    with pytest.raises(ToolArgumentsInvalid, match="limit"):
        spec.validate({"query": "x", "limit": 11})
    with pytest.raises(ToolArgumentsInvalid, match="query"):
        spec.validate({"query": ""})


@pytest.mark.parametrize("query", ["how can you", "the and for what", "is a to", "?!"])
def test_a_query_of_only_stopwords_or_short_words_finds_nothing(articles, query):
    assert search(query) == {"query": query, "articles": []}


def test_no_match_is_an_empty_list(articles):
    assert search("quantum chromodynamics")["articles"] == []


def test_articles_carry_the_body_truncated(db):
    KnowledgeArticle.objects.create(title="Long read", body="word " * 500, tags="")
    (article,) = search("long read")["articles"]
    assert article == {"title": "Long read", "body": ("word " * 500)[:1000]}
