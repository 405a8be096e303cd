"""A safe arithmetic evaluator for the calculator tool: parses with ``ast`` and walks an allow-list.

Nothing is ever passed to ``eval``: the expression is parsed in ``mode="eval"`` and only numbers, the
four operations, ``//``, ``%``, ``**``, unary signs, parentheses and a few math functions are accepted.
Results are size-guarded before they are computed (``10**10**10`` or ``9**99999`` are rejected, not
attempted), following the lesson of LLMMathChain's code-execution CVEs (SECURITY.md §1).

Example::

    >>> evaluate("3 * (2 + 4) / 4")
    4.5
    >>> format_number(evaluate("1,200 - 200"))
    '1000'
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

from ragloop.core.errors import UsageError

MAX_CHARS = 300
MAX_DIGITS = 400  # an integer result longer than this is refused
MAX_NODES = 200


class CalculatorError(UsageError):
    """The expression is not plain arithmetic, or its result would be too large."""


_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_FUNCS: dict[str, Callable[..., float]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTS = {"pi": math.pi, "e": math.e}


def normalize_expression(expr: str) -> str:
    """Common human notations made Python: ``"$1,200 × 3 ^ 2"`` -> ``"1200 * 3 ** 2"``."""
    s = expr.strip().strip("`").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = s.replace("$", "").replace("×", "*").replace("÷", "/").replace("^", "**").replace("−", "-")
    s = re.sub(r"(?<=\d)\s*[xX]\s*(?=[\d(])", " * ", s)  # 5 x 3
    s = re.sub(r"(\d+(?:\.\d+)?)\s*%", r"(\1/100)", s)  # 15% -> (15/100)
    s = s.rstrip("=").strip()
    return s


def _digits(x: float) -> float:
    return math.log10(abs(x)) + 1 if x else 1.0


def _check_size(op: type[ast.operator], a: float, b: float) -> None:
    if op is ast.Pow:
        if abs(b) > 10_000:
            raise CalculatorError(f"exponent {b} is too large")
        if isinstance(a, int) and isinstance(b, int) and b > 0 and _digits(a) * b > MAX_DIGITS:
            raise CalculatorError("result of ** would be too large")
    if op is ast.Mult and isinstance(a, int) and isinstance(b, int) and _digits(a) + _digits(b) > MAX_DIGITS:
        raise CalculatorError("result of * would be too large")


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return v if isinstance(node.op, ast.UAdd) else -v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        _check_size(type(node.op), a, b)
        try:
            return _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result is too large") from None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCS
        and not node.keywords
        and 1 <= len(node.args) <= 4
    ):
        args = [_eval(a) for a in node.args]
        try:
            return _FUNCS[node.func.id](*args)
        except (ValueError, TypeError) as e:
            raise CalculatorError(f"{node.func.id}: {e}") from None
    raise CalculatorError(f"not allowed in a calculator expression: {ast.dump(node)[:60]}")


def evaluate(expr: str) -> float:
    """Value of an arithmetic expression; ``CalculatorError`` names what is wrong."""
    if not isinstance(expr, str) or not expr.strip():
        raise CalculatorError("empty expression")
    if len(expr) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    src = normalize_expression(expr)
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expr!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError("expression is too long")
    value = _eval(tree)
    if isinstance(value, int) and _digits(value) > MAX_DIGITS:
        raise CalculatorError("result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def format_number(x: float) -> str:
    """Short text for a number: ``format_number(4.0) -> '4'``, ``format_number(1/3) -> '0.333333'``."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if math.isfinite(x) and x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if abs(x) >= 1e15 or abs(x) < 1e-4:
        return repr(x)
    return f"{x:.6f}".rstrip("0").rstrip(".")
