"""The built-in calculator (knowledge_search, http_get and send_email have their own files)."""

from __future__ import annotations

import pytest

from tools.builtin import CalculatorArgs, calculator
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
