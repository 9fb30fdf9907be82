"""The built-in ``calculator``: arithmetic without eval."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from .registry import ToolContext, ToolError, tool

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_MAX_MAGNITUDE = 1e100


class CalculatorArgs(BaseModel):
    expression: str = Field(
        max_length=200, description="An arithmetic expression, e.g. '(3 + 4) * 2 / 7'."
    )


def _checked(value: Any) -> float | int:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
        raise ToolError("result out of range")
    return value


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise ToolError("booleans are not numbers here")
        return _checked(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
            raise ToolError("exponent too large")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("result out of range") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    raise ToolError(f"unsupported expression element: {type(node).__name__}")


@tool(
    name="calculator",
    description="Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
    risk="low",
    timeout=5,
)
def calculator(args: CalculatorArgs, ctx: ToolContext) -> dict[str, Any]:
    try:
        tree = ast.parse(args.expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {args.expression!r}") from None
    value = _evaluate(tree)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return {"expression": args.expression, "result": value}


class EscalateArgs(BaseModel):
    reason: str = Field(min_length=1, max_length=1000, description="Why a human is needed.")
    question: str = Field(
        default="", max_length=2000, description="What to ask the human, if anything."
    )


@tool(
    name="escalate_to_human",
    description=(
        "Ask a human reviewer for help or a decision when you cannot or should not go on alone. "
        "The run pauses until a reviewer answers; their reply is this tool's result."
    ),
    risk="low",
    timeout=5,
    retries=0,
    requires_approval=True,
)
def escalate_to_human(args: EscalateArgs, ctx: ToolContext) -> dict[str, Any]:
    # The engine holds every call of this tool for a reviewer, whose decision is its result.
    raise ToolError("escalate_to_human is answered by a human reviewer, never executed")
