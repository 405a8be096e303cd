"""The sandbox's AST allow-list and the rewrite that puts size guards into a validated program.

This module is **stdlib-only**: the sandbox child (``_worker.py``, run as ``python -I -S``) loads it by
file path, and the host imports it only for tests and documentation. Nothing here executes user code.

Policy (SECURITY.md §1, item 4) — an allow-list, never a deny-list:

- node types: only those in ``ALLOWED_NODES``; every other node (classes, lambda, try/with/raise,
  yield/await, global/nonlocal, match, decorators, and any syntax a newer Python adds) is rejected;
- names: a variable may be ``_`` but no other name starting with ``_`` (so ``__builtins__``,
  ``__import__`` and the sandbox's own ``__rl_*`` helpers are unreachable) — except that ``__name__``
  may be read, so the common ``if __name__ == "__main__":`` footer does not get a program rejected; loading a Python builtin that
  the sandbox does not provide (``open``, ``eval``, ``getattr``, ``type`` …) is rejected unless the program
  binds that name itself;
- attributes: only names in ``ALLOWED_ATTRIBUTES`` — the public methods of the value types a program can
  make (str, list, dict, set, numbers, Fraction, Decimal, dates) and the public names of the allowed
  modules. ``format``, ``format_map``, ``mro`` and every frame / code / generator attribute are absent;
- imports: ``import m`` / ``from m import n`` only for ``m`` in ``ALLOWED_MODULES`` and ``n`` among that
  module's allowed names;
- f-string format specs must be short constants (no nested expressions, widths under 10 000).

Python already NFKC-normalises identifiers while parsing (PEP 3131), so ``ｅｖａｌ`` arrives here as
``eval``; the checks below normalise again anyway, so a future parser change cannot reopen that door.

``rewrite`` then replaces ``a ** b``, ``a << b``, ``a * b`` (and their augmented forms) with calls of the
hidden helper ``__rl_binop(op, a, b)``, which estimates the size of the result before computing it —
the guard against ``10**10**10`` and ``[0]*10**10`` freezing the child (smolagents' big-int lesson).
"""

from __future__ import annotations

import ast
import builtins
import unicodedata

# Helpers the worker injects; the validator makes them unreachable from user code (leading "__").
BINOP_HELPER = "__rl_binop"
AUGITEM_HELPER = "__rl_augitem"

# Builtins the sandbox provides (some are guarded wrappers in the worker: pow, round, range, print).
ALLOWED_BUILTINS: frozenset[str] = frozenset(
    """abs all any bin bool chr dict divmod enumerate filter float frozenset hex int isinstance iter len
    list map max min next oct ord pow print range repr reversed round set sorted str sum tuple zip""".split()
)

# Modules a program may import, each with the public names it may use (a restricted proxy is built
# from exactly these). Names missing in the running Python version are skipped by the worker.
ALLOWED_MODULES: dict[str, frozenset[str]] = {
    "math": frozenset(
        """acos acosh asin asinh atan atan2 atanh cbrt ceil comb copysign cos cosh degrees dist e erf erfc
        exp exp2 expm1 fabs factorial floor fmod frexp fsum gamma gcd hypot inf isclose isfinite isinf isnan
        isqrt lcm ldexp lgamma log log10 log1p log2 modf nan nextafter perm pi pow prod radians remainder
        sin sinh sqrt sumprod tan tanh tau trunc ulp""".split()
    ),
    "fractions": frozenset({"Fraction"}),
    "decimal": frozenset(
        """Decimal ROUND_05UP ROUND_CEILING ROUND_DOWN ROUND_FLOOR ROUND_HALF_DOWN ROUND_HALF_EVEN
        ROUND_HALF_UP ROUND_UP""".split()
    ),
    "statistics": frozenset(
        """correlation covariance fmean geometric_mean harmonic_mean linear_regression mean median
        median_grouped median_high median_low mode multimode pstdev pvariance quantiles stdev
        variance""".split()
    ),
    "datetime": frozenset({"date", "datetime", "time", "timedelta", "timezone", "MINYEAR", "MAXYEAR"}),
}

# Public attributes of the values a program can build. Deliberately absent: format, format_map, mro,
# encode/to_bytes/from_bytes (bytes are not needed for arithmetic), every gi_/f_/co_/tb_/cr_/ag_ name.
_VALUE_ATTRIBUTES = frozenset(
    """
    capitalize casefold center count endswith expandtabs find index isalnum isalpha isascii isdecimal
    isdigit isidentifier islower isnumeric isspace istitle isupper join ljust lower lstrip maketrans
    partition removeprefix removesuffix replace rfind rindex rjust rpartition rsplit rstrip split
    splitlines startswith strip swapcase title translate upper zfill
    append clear copy extend insert pop remove reverse sort
    fromkeys get items keys popitem setdefault update values
    add difference difference_update discard intersection intersection_update isdisjoint issubset
    issuperset symmetric_difference symmetric_difference_update union
    as_integer_ratio bit_count bit_length conjugate denominator numerator real imag is_integer hex
    limit_denominator from_float from_decimal
    start stop step
    adjusted compare copy_abs copy_negate copy_sign ln is_finite is_infinite is_nan is_signed is_zero
    normalize quantize to_integral to_integral_value to_eng_string
    slope intercept week
    year month day hour minute second microsecond microseconds days seconds weekday isoweekday isoformat
    isocalendar strftime total_seconds date time today now fromisoformat strptime combine toordinal
    fromordinal timestamp fromtimestamp tzinfo utc utcoffset astimezone ctime min max resolution
    """.split()
)

ALLOWED_ATTRIBUTES: frozenset[str] = _VALUE_ATTRIBUTES.union(*ALLOWED_MODULES.values())

# Names rejected outright even if they were ever added to a list above (defence in depth).
_NEVER_ATTRIBUTES = frozenset({"format", "format_map", "mro", "register", "subclasses"})
_NEVER_PREFIXES = ("_", "f_", "co_", "gi_", "cr_", "ag_", "tb_", "func_", "im_")

# Builtins a program might reach for and does not get; loading one (unbound) is a validation error
# with a clear message instead of a NameError at run time.
_UNAVAILABLE_BUILTINS = frozenset(
    name
    for name in dir(builtins)
    if not name.startswith("_")
    and name not in ALLOWED_BUILTINS
    and not (isinstance(getattr(builtins, name), type) and issubclass(getattr(builtins, name), BaseException))
) | {"exit", "quit", "help", "copyright", "credits", "license"}

ALLOWED_NODES: tuple[type[ast.AST], ...] = (
    # statements
    ast.Module, ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.While, ast.If,
    ast.FunctionDef, ast.Return, ast.Pass, ast.Break, ast.Continue, ast.Delete, ast.Import,
    ast.ImportFrom, ast.alias, ast.Assert,
    # expressions
    ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.IfExp, ast.Dict, ast.Set, ast.ListComp, ast.SetComp,
    ast.DictComp, ast.GeneratorExp, ast.Compare, ast.Call, ast.keyword, ast.JoinedStr,
    ast.FormattedValue, ast.Constant, ast.Attribute, ast.Subscript, ast.Starred, ast.Name, ast.List,
    ast.Tuple, ast.Slice, ast.NamedExpr, ast.comprehension, ast.arguments, ast.arg,
    # contexts and operators
    ast.Load, ast.Store, ast.Del, ast.And, ast.Or, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv,
    ast.Mod, ast.Pow, ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd, ast.UAdd, ast.USub,
    ast.Not, ast.Invert, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In,
    ast.NotIn,
)  # fmt: skip

# Why a common rejected construct is rejected — the message the model (or user) sees.
_REJECT_REASONS: dict[str, str] = {
    "ClassDef": "classes are not allowed; use functions and plain values",
    "Lambda": "lambda is not allowed; define a function with def",
    "Try": "try/except is not allowed; check values with if instead",
    "TryStar": "try/except* is not allowed",
    "With": "with-statements are not allowed (there are no files or contexts)",
    "AsyncWith": "async code is not allowed",
    "Raise": "raise is not allowed; return a value instead",
    "Global": "global is not allowed; pass values as arguments and return results",
    "Nonlocal": "nonlocal is not allowed; pass values as arguments and return results",
    "Yield": "generators (yield) are not allowed; build and return a list",
    "YieldFrom": "generators (yield from) are not allowed; build and return a list",
    "Await": "async code is not allowed",
    "AsyncFunctionDef": "async functions are not allowed",
    "AsyncFor": "async code is not allowed",
    "Match": "match statements are not allowed; use if/elif",
    "MatMult": "the @ operator is not allowed",
}

_GUARDED_OPS: dict[type[ast.operator], str] = {ast.Pow: "**", ast.LShift: "<<", ast.Mult: "*"}
_MAX_SPEC_CHARS = 32
_MAX_SPEC_DIGITS = 4


class ProgramRejected(Exception):
    """The program contains something outside the allow-list; ``str(err)`` says what and where."""

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(f"line {lineno}: {message}" if lineno else message)
        self.reason = message
        self.lineno = lineno


def _norm(name: str) -> str:
    return unicodedata.normalize("NFKC", name)


def _check_identifier(name: str, what: str, node: ast.AST, *, allow_underscore: bool = False) -> None:
    name = _norm(name)
    if name == "_" and allow_underscore:
        return
    if name.startswith("_"):
        raise ProgramRejected(f"{what} {name!r} starts with '_', which is not allowed", _line(node))


def _line(node: ast.AST) -> int | None:
    return getattr(node, "lineno", None)


def bound_names(tree: ast.AST) -> set[str]:
    """Every name the program binds anywhere (assignment targets, defs, arguments, imports, loops).

    >>> sorted(bound_names(ast.parse("x = 1\\ndef f(a): return a\\nimport math as m")))
    ['a', 'f', 'm', 'x']
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(_norm(node.id))
        elif isinstance(node, ast.FunctionDef):
            names.add(_norm(node.name))
        elif isinstance(node, ast.arg):
            names.add(_norm(node.arg))
        elif isinstance(node, ast.alias):
            names.add(_norm(node.asname or node.name))
    return names


def _longest_digit_run(text: str) -> int:
    """``_longest_digit_run(">12.345f") -> 3`` (stdlib ``re`` is avoided to keep the child's start fast)."""
    best = run = 0
    for ch in text:
        run = run + 1 if ch.isdigit() else 0
        best = max(best, run)
    return best


def _check_format_spec(spec: ast.AST, node: ast.AST) -> None:
    if not isinstance(spec, ast.JoinedStr) or not all(
        isinstance(v, ast.Constant) and isinstance(v.value, str) for v in spec.values
    ):
        raise ProgramRejected("f-string format specs must be constants (no nested {…})", _line(node))
    text = "".join(v.value for v in spec.values)  # type: ignore[attr-defined]
    if len(text) > _MAX_SPEC_CHARS or _longest_digit_run(text) > _MAX_SPEC_DIGITS:
        raise ProgramRejected(f"f-string format spec {text!r} is too large", _line(node))


def validate(tree: ast.Module) -> None:
    """Raise ProgramRejected unless every node of ``tree`` is on the allow-list (see module docstring).

    >>> validate(ast.parse("def solution():\\n    return 2 * 3"))
    >>> try:
    ...     validate(ast.parse("().__class__"))
    ... except ProgramRejected as err:
    ...     print(err)
    line 1: attribute '__class__' is not available in the sandbox
    """
    if not isinstance(tree, ast.Module):
        raise ProgramRejected("expected a module")
    bound = bound_names(tree)
    problems: list[tuple[tuple[int, int, int], ProgramRejected]] = []
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:  # iterative: deeply nested programs cannot exhaust the validator's own stack
        node, depth = stack.pop()
        try:
            if not isinstance(node, ALLOWED_NODES):
                kind = type(node).__name__
                raise ProgramRejected(
                    _REJECT_REASONS.get(kind, f"{kind} is not allowed in the sandbox"), _line(node)
                )
            _check_node(node, bound)
        except ProgramRejected as err:
            # report the first problem in reading order; at one position, the innermost node
            problems.append(((_line(node) or 0, getattr(node, "col_offset", 0) or 0, -depth), err))
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    if problems:
        raise min(problems, key=lambda p: p[0])[1]


def _check_node(node: ast.AST, bound: set[str]) -> None:
    if isinstance(node, ast.Name):
        if _norm(node.id) == "__name__" and isinstance(node.ctx, ast.Load):
            return  # reading the module name (a plain string) keeps `if __name__ == "__main__":` working
        _check_identifier(node.id, "name", node, allow_underscore=True)
        name = _norm(node.id)
        if isinstance(node.ctx, ast.Load) and name in _UNAVAILABLE_BUILTINS and name not in bound:
            raise ProgramRejected(
                f"{name!r} is not available in the sandbox (no files, imports of other modules or "
                f"introspection); available builtins: {', '.join(sorted(ALLOWED_BUILTINS))}",
                _line(node),
            )
    elif isinstance(node, ast.Attribute):
        attr = _norm(node.attr)
        if attr not in ALLOWED_ATTRIBUTES or attr in _NEVER_ATTRIBUTES or attr.startswith(_NEVER_PREFIXES):
            raise ProgramRejected(f"attribute {attr!r} is not available in the sandbox", _line(node))
        if not isinstance(node.ctx, ast.Load):
            raise ProgramRejected("setting or deleting attributes is not allowed", _line(node))
    elif isinstance(node, ast.FunctionDef):
        _check_identifier(node.name, "function name", node)
        if node.decorator_list:
            raise ProgramRejected("decorators are not allowed", _line(node))
        if getattr(node, "type_params", None):
            raise ProgramRejected("type parameters are not allowed", _line(node))
    elif isinstance(node, ast.arg):
        _check_identifier(node.arg, "argument", node, allow_underscore=True)
    elif isinstance(node, ast.keyword):
        if node.arg is not None:
            _check_identifier(node.arg, "keyword argument", node)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            _check_module(alias.name, node)
            if alias.asname:
                _check_identifier(alias.asname, "import alias", node)
    elif isinstance(node, ast.ImportFrom):
        if node.level or not node.module:
            raise ProgramRejected("relative imports are not allowed", _line(node))
        _check_module(node.module, node)
        allowed = ALLOWED_MODULES[_norm(node.module)]
        for alias in node.names:
            name = _norm(alias.name)
            if name == "*":
                raise ProgramRejected(
                    f"'from {node.module} import *' is not allowed; name what you use", _line(node)
                )
            if name not in allowed:
                raise ProgramRejected(f"{node.module}.{name} is not available in the sandbox", _line(node))
            if alias.asname:
                _check_identifier(alias.asname, "import alias", node)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (str, bytes, int, float, complex, bool, type(None), type(...))):
            raise ProgramRejected(f"constant of type {type(node.value).__name__} is not allowed", _line(node))
    elif isinstance(node, ast.FormattedValue):
        if node.format_spec is not None:
            _check_format_spec(node.format_spec, node)
    elif isinstance(node, ast.comprehension):
        if node.is_async:
            raise ProgramRejected("async comprehensions are not allowed", _line(node.target))
    elif isinstance(node, ast.AugAssign):
        if type(node.op) in _GUARDED_OPS and isinstance(node.target, ast.Subscript):
            if any(isinstance(n, ast.Slice) for n in ast.walk(node.target.slice)):
                raise ProgramRejected(
                    "augmented assignment with *, ** or << to a slice is not allowed", _line(node)
                )


def _check_module(name: str, node: ast.AST) -> None:
    name = _norm(name)
    if name not in ALLOWED_MODULES:
        raise ProgramRejected(
            f"import of {name!r} is not allowed; the sandbox offers only {', '.join(sorted(ALLOWED_MODULES))}",
            _line(node),
        )


class _GuardRewriter(ast.NodeTransformer):
    """Turn ``a ** b``, ``a << b``, ``a * b`` (and ``x op= y``) into ``__rl_binop('op', a, b)`` calls."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        op = _GUARDED_OPS.get(type(node.op))
        if op is None:
            return node
        call = ast.Call(
            func=ast.Name(id=BINOP_HELPER, ctx=ast.Load()),
            args=[ast.Constant(op), node.left, node.right],
            keywords=[],
        )
        return ast.copy_location(call, node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        op = _GUARDED_OPS.get(type(node.op))
        if op is None:
            return node
        target = node.target
        if isinstance(target, ast.Name):
            value = ast.Call(
                func=ast.Name(id=BINOP_HELPER, ctx=ast.Load()),
                args=[ast.Constant(op), ast.Name(id=target.id, ctx=ast.Load()), node.value],
                keywords=[],
            )
            new: ast.stmt = ast.Assign(targets=[ast.Name(id=target.id, ctx=ast.Store())], value=value)
        elif isinstance(target, ast.Subscript):
            # container[key] op= value  ->  __rl_augitem('op', container, key, value)
            new = ast.Expr(
                ast.Call(
                    func=ast.Name(id=AUGITEM_HELPER, ctx=ast.Load()),
                    args=[ast.Constant(op), target.value, target.slice, node.value],
                    keywords=[],
                )
            )
        else:  # attribute targets are rejected by validate(); refuse rather than guess
            raise ProgramRejected("unsupported augmented assignment target", _line(node))
        return ast.copy_location(new, node)


def rewrite(tree: ast.Module) -> ast.Module:
    """Return ``tree`` with size-guarded arithmetic (call only after ``validate``).

    >>> ast.unparse(rewrite(ast.parse("x = 2 ** 10\\nx *= 3")))
    "x = __rl_binop('**', 2, 10)\\nx = __rl_binop('*', x, 3)"
    """
    tree = _GuardRewriter().visit(tree)
    return ast.fix_missing_locations(tree)
