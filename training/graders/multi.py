"""``multi``: a formula over named sub-graders' scores, evaluated without ``eval``.

The formula is parsed with ``ast`` and only numbers, the sub-graders' names, ``+ - * / // % **``,
unary signs and the functions OpenAI lists (``min max abs floor ceil exp sqrt log``) are
allowed, so a formula cannot reach Python.

Names: with ``graders`` as an object (OpenAI's documented form) its keys are the names. With a
list, each sub-grader is named by its ``name`` (non-identifier characters as ``_``), and also
``<type>_score`` when it is the only sub-grader of its type (as the spec's example writes).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any

FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil,
             "exp": math.exp, "sqrt": math.sqrt, "log": math.log}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class FormulaError(ValueError):
    """The formula does not parse, or names something that is not a sub-grader."""


def variables(graders: Any) -> dict[str, Any]:
    if isinstance(graders, dict):
        return dict(graders)
    listed = graders if isinstance(graders, list) else [graders]
    named = {re.sub(r"\W", "_", g.name): g for g in listed}
    types = [g.type for g in listed]
    named.update({f"{g.type}_score": g for g in listed if types.count(g.type) == 1})
    return named


def parse(formula: str, names: set[str]) -> ast.Expression:
    """Parse and check ``formula``; every name must be a sub-grader or a function."""
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"calculate_output does not parse: {exc.msg} in {formula!r}") \
            from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in FUNCTIONS:
            raise FormulaError(f"calculate_output names {node.id!r}, which is not a sub-grader "
                               f"(sub-graders: {', '.join(sorted(names))})")
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load,
                   ast.Call, *_BINARY, *_UNARY)
        if not isinstance(node, allowed):
            raise FormulaError(f"calculate_output may hold numbers, sub-grader names, "
                               f"arithmetic and {', '.join(FUNCTIONS)}; not "
                               f"{type(node).__name__}")
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name)
                                           or node.func.id not in FUNCTIONS or node.keywords):
            raise FormulaError("calculate_output may call only "
                               f"{', '.join(FUNCTIONS)}, with plain arguments")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise FormulaError(f"calculate_output holds {node.value!r}, which is not a number")
    return tree


def evaluate(tree: ast.Expression, scores: dict[str, float]) -> float:
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)  # floats overflow at once; ints could grow for minutes
        if isinstance(node, ast.Name):
            return scores[node.id]
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id](*(value(a) for a in node.args))  # type: ignore[attr-defined]
        raise FormulaError(f"unexpected {type(node).__name__}")

    return float(value(tree.body))
