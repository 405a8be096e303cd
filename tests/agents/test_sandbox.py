"""The code sandbox as a security boundary (SECURITY.md §1): every attack of the list and more, each
run through the real child process, must end in its typed error; legit PAL programs (the paper's
8 GSM8K exemplars, read from ../shared/data/pal at test time, and realistic model-style programs) must
all run. Attacks run once per session on a small thread pool; each is then checked as its own test."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ragloop.agents.sandbox import ERROR_TYPES, Sandbox, SandboxLimits, SandboxResult
from ragloop.core.errors import ConfigError, UsageError

PAL_PROMPT = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pal" / "pal_gsm8k_math_prompt.txt"
)
FAST = SandboxLimits(wall_seconds=3.0, cpu_seconds=2)
REPO = str(Path(__file__).resolve().parents[2])


def S(body: str) -> str:
    """A ``def solution():`` program with ``body`` (dedented lines) as its body."""
    lines = body.strip("\n").splitlines()
    return "def solution():\n" + "\n".join("    " + ln for ln in lines) + "\n"


# (id, source, entry, expected error_type, a regex the message must match)
ATTACKS: list[tuple[str, str, str | None, str, str]] = [
    # --- more resource and arithmetic tricks ---
    (
        "fraction_pow_whole_fraction_exponent",
        "from fractions import Fraction\nanswer = Fraction(10) ** Fraction(10**9)\n",
        None,
        "memory",
        r"\*\*",
    ),
    (
        "int_pow_fraction_exponent",
        "from fractions import Fraction\nanswer = 10 ** Fraction(10**9)\n",
        None,
        "memory",
        r"\*\*",
    ),
    (  # issue 14: a negative exponent of a Fraction is as large as a positive one (was a 5.8 s timeout)
        "fraction_pow_negative_exponent",
        "from fractions import Fraction\nanswer = Fraction(2, 3) ** -(10**9)\n",
        None,
        "memory",
        r"\*\* would give",
    ),
    (
        "fraction_pow_negative_fraction_exponent",
        "from fractions import Fraction\nanswer = 7 ** Fraction(-(10**9))\n",
        None,
        "memory",
        r"\*\* would give",
    ),
    (
        "decimal_pow_huge_exponent",
        "from decimal import Decimal\nanswer = Decimal(10) ** (10**9)\n",
        None,
        "runtime",
        "Overflow",
    ),
    (
        "nested_list_repr",
        S("a = []\nfor _ in range(100000):\n    a = [a]\nreturn str(a)"),
        "solution",
        "runtime",
        "RecursionError",
    ),
    (
        "list_extend_doubling",
        S("a = [0]\nfor _ in range(40):\n    a.extend(a)\nreturn len(a)"),
        "solution",
        "memory",
        "MemoryError",
    ),
    ("str_center_huge", S("return len('x'.center(10**9))"), "solution", "memory", "MemoryError"),
    ("print_sep_bomb", S("print(1, 2, sep='x' * 10**6)"), "solution", "output_limit", "printed more than"),
    # --- the list in SECURITY.md §1 ---
    ("dunder_import_os_system", "__import__('os').system('id')", None, "validation", "__import__"),
    (
        "mro_subclasses",
        S("return ().__class__.__mro__[1].__subclasses__()"),
        "solution",
        "validation",
        "__class__",
    ),
    ("str_format_attribute_walk", S("return '{0.__class__}'.format(1)"), "solution", "validation", "format"),
    (
        "try_except_traceback_frame_walk",
        S("try:\n    1/0\nexcept Exception as e:\n    return e.__traceback__.tb_frame.f_back.f_globals"),
        "solution",
        "validation",
        "try/except",
    ),
    (
        "generator_gi_frame",
        S("g = (x for x in [1])\nreturn g.gi_frame.f_back.f_globals"),
        "solution",
        "validation",
        "gi_frame",
    ),
    (
        "decorator_exec_trick",
        "@exec\n@input\ndef f():\n    pass\n",
        None,
        "validation",
        "decorator|exec|input",
    ),
    (
        "class_with_del",
        "class A:\n    def __del__(self):\n        print(1)\nA()\n",
        None,
        "validation",
        "classes",
    ),
    ("fullwidth_open", "ｏｐｅｎ('/etc/passwd').read()", None, "validation", "'open' is not available"),
    ("while_true", S("while True:\n    pass"), "solution", "timeout", "wall clock|CPU"),
    ("pow_tower", S("return 10**10**10"), "solution", "memory", r"\*\* would give"),
    ("list_repeat_huge", S("return [0]*10**10"), "solution", "memory", "repeating a sequence"),
    (
        "unbounded_recursion",
        "def f(n):\n    return f(n + 1)\ndef solution():\n    return f(0)\n",
        "solution",
        "runtime",
        "RecursionError",
    ),
    (
        "print_flood_loop",
        S("for i in range(10**7):\n    print(i)"),
        "solution",
        "output_limit",
        "printed more than",
    ),
    ("raise_system_exit", "raise SystemExit\n", None, "validation", "raise is not allowed"),
    ("return_function", S("return solution"), "solution", "bad_value", "function"),
    # --- imports and names ---
    ("import_os", "import os\n", None, "validation", "import of 'os' is not allowed"),
    ("from_os_import", "from os import system\n", None, "validation", "import of 'os'"),
    ("import_sys_via_alias", "import math as sys\nimport sys\n", None, "validation", "import of 'sys'"),
    ("import_submodule", "import os.path\n", None, "validation", "os.path"),
    ("from_math_star", "from math import *\n", None, "validation", r"import \*"),
    (
        "from_fractions_import_module_global",
        "from fractions import math\n",
        None,
        "validation",
        "fractions.math is not available",
    ),
    ("relative_import", "from . import x\n", None, "validation", "relative imports"),
    ("math_dict", "import math\nanswer = math.__dict__\n", None, "validation", "__dict__"),
    (
        "module_proxy_private",
        "import decimal\nanswer = decimal.getcontext()\n",
        None,
        "validation",
        "getcontext",
    ),
    ("eval_call", "answer = eval('1+1')\n", None, "validation", "'eval' is not available"),
    ("exec_call", "exec('import os')\n", None, "validation", "'exec' is not available"),
    ("compile_call", "answer = compile('1', 'f', 'eval')\n", None, "validation", "'compile'"),
    ("getattr_dunder", "answer = getattr(1, '__class__')\n", None, "validation", "'getattr'"),
    ("globals_builtins", "answer = globals()['__builtins__']\n", None, "validation", "'globals'"),
    ("vars_call", "answer = vars()\n", None, "validation", "'vars'"),
    ("type_three_args", "T = type('T', (), {})\n", None, "validation", "'type'"),
    (
        "object_subclasses",
        "answer = object.__subclasses__()\n",
        None,
        "validation",
        "'object'|__subclasses__",
    ),
    ("breakpoint_call", "breakpoint()\n", None, "validation", "'breakpoint'"),
    ("input_call", "answer = input()\n", None, "validation", "'input'"),
    ("exit_call", "exit(0)\n", None, "validation", "'exit'"),
    ("builtins_name", "answer = __builtins__\n", None, "validation", "__builtins__"),
    ("assign_dunder_name", "__name__ = 'x'\n", None, "validation", "__name__"),
    ("sandbox_helper_name", "answer = __rl_binop('*', 2, 3)\n", None, "validation", "__rl_binop"),
    ("underscore_variable", "_secret = 1\n", None, "validation", "'_secret'"),
    ("underscore_keyword", "answer = dict(__class__=1)\n", None, "validation", "__class__"),
    ("fullwidth_attribute_format", S("return '{}'.ｆｏｒｍａｔ(1)"), "solution", "validation", "'format'"),
    ("fullwidth_eval", "ｅｖａｌ('1')\n", None, "validation", "'eval'"),
    ("str_format_map", S("return '{x}'.format_map({'x': 1})"), "solution", "validation", "format_map"),
    ("type_mro_method", S("return int.mro()"), "solution", "validation", "'mro'"),
    ("encode_bytes", S("return 'a'.encode()"), "solution", "validation", "'encode'"),
    ("int_from_bytes", S("return int.from_bytes(b'ab', 'big')"), "solution", "validation", "from_bytes"),
    ("fstring_dunder", S("return f'{().__class__}'"), "solution", "validation", "__class__"),
    ("fstring_width_bomb", S("return f'{1:>999999999}'"), "solution", "validation", "format spec"),
    (
        "fstring_nested_spec",
        S("w = 5\nreturn f'{1:>{w}}'"),
        "solution",
        "validation",
        "format specs must be constants",
    ),
    # --- syntax the allow-list does not include ---
    ("lambda_globals", "f = lambda: 0\nanswer = f.__globals__\n", None, "validation", "lambda"),
    ("generator_function", "def g():\n    yield 1\nanswer = list(g())\n", None, "validation", "yield"),
    ("with_open", "with open('/etc/passwd') as f:\n    answer = f.read()\n", None, "validation", "with"),
    ("global_statement", "x = 1\ndef f():\n    global x\n    x = 2\n", None, "validation", "global"),
    ("async_def", "async def f():\n    pass\n", None, "validation", "async"),
    ("match_statement", "match 1:\n    case 1:\n        answer = 1\n", None, "validation", "match"),
    ("set_attribute", "import math\nmath.pi = 3\n", None, "validation", "attributes"),
    ("del_attribute", "import math\ndel math.pi\n", None, "validation", "attributes"),
    ("matmul", "answer = [1] @ [2]\n", None, "validation", "@"),
    # --- resource exhaustion ---
    ("lshift_huge", S("return 1 << 10**9"), "solution", "memory", "<< would give"),
    ("augassign_pow", S("x = 2\nx **= 10**9\nreturn x"), "solution", "memory", r"\*\*"),
    ("augassign_item_mult", S("a = [10**3000]\na[0] *= 10**3000\nreturn 1"), "solution", "memory", r"\*"),
    ("builtin_pow", S("return pow(10, 10**9)"), "solution", "memory", r"\*\*"),
    (
        "repeated_squaring",
        S("x = 3\nfor _ in range(40):\n    x = x * x\nreturn 1"),
        "solution",
        "memory",
        r"\*",
    ),
    ("string_repeat", S("return len('ab' * 10**9)"), "solution", "memory", "repeating"),
    ("range_huge_list", S("return len(list(range(10**9)))"), "solution", "memory", "range"),
    ("factorial_huge", "import math\nanswer = math.factorial(10**6)\n", None, "memory", "factorial"),
    ("comb_huge", "import math\nanswer = math.comb(10**6, 5*10**5)\n", None, "memory", "comb"),
    ("prod_huge", "import math\nanswer = math.prod([10**1000] * 10)\n", None, "memory", r"\*"),
    ("round_ndigits_huge", S("return round(5, -10**9)"), "solution", "memory", "round"),
    (
        "decimal_exponent_huge",
        "from decimal import Decimal\nanswer = int(Decimal('1e100000000'))\n",
        None,
        "memory",
        "Decimal",
    ),
    (
        "fraction_exponent_huge",
        "from fractions import Fraction\nanswer = Fraction('1e100000000')\n",
        None,
        "memory",
        "Fraction",
    ),
    (
        "decimal_power_overflow",
        "from decimal import Decimal\nanswer = Decimal(10) ** 100000\n",
        None,
        "runtime",
        "Overflow",
    ),
    ("int_parse_digit_limit", S("return int('9' * 5000)"), "solution", "runtime", "ValueError"),
    ("int_literal_digit_limit", "answer = " + "9" * 5000 + "\n", None, "validation", "SyntaxError"),
    (
        "memory_hog",
        S("x = 'a' * 9000000\nys = [x + str(i) for i in range(200)]\nreturn len(ys)"),
        "solution",
        "memory",
        "MemoryError",
    ),
    ("print_one_huge_string", S("print('a' * 10**6)"), "solution", "output_limit", "printed more than"),
    ("return_huge_string", S("return 'a' * 10**6"), "solution", "output_limit", "bytes as JSON"),
    ("return_cycle", S("a = []\na.append(a)\nreturn a"), "solution", "bad_value", "nested deeper"),
    ("return_generator", S("return (i for i in range(3))"), "solution", "bad_value", "generator"),
    ("return_complex", S("return (-8) ** 0.5"), "solution", "bad_value", "complex"),
    (
        "return_module_proxy",
        "import math\ndef solution():\n    return math\n",
        "solution",
        "bad_value",
        "JSON",
    ),
    (
        "nested_loops_cpu",
        S("t = 0\nfor i in range(10**7):\n    for j in range(10**7):\n        t += 1"),
        "solution",
        "timeout",
        "wall clock|CPU",
    ),
    # --- parser and host-side checks ---
    (
        "deep_parens",
        "answer = " + "(" * 5000 + "1" + ")" * 5000 + "\n",
        None,
        "validation",
        "SyntaxError|nested",
    ),
    ("deep_binop_chain", "answer = " + "+".join(["1"] * 5000) + "\n", None, "validation|ok", ""),
    ("nul_byte", "answer = 1\x00\n", None, "validation", "NUL"),
    ("oversized_source", "x = 1\n" * 4000, None, "validation", "bytes; the limit is 20000"),
    ("too_many_lines", "\n" * 1500, None, "validation", "lines; the limit is 1000"),
    ("lone_surrogate", "answer = '\ud800'\n", None, "validation", "surrogate"),
    ("syntax_error", "def solution(:\n", "solution", "validation", "SyntaxError"),
    ("return_outside_function", "return 5\n", None, "validation", "SyntaxError"),
    # --- runtime errors are typed and sanitised ---
    (
        "zero_division",
        S("a = 1\nreturn a / 0"),
        "solution",
        "runtime",
        r"^line 3 \(return a / 0\): ZeroDivisionError",
    ),
    ("print_to_file", S("print('x', file=None)\nprint('y', file=1)"), "solution", "runtime", "file="),
    (
        "forged_result_line",
        'print(\'{"ok": true, "value": 1}\')\n',
        "solution",
        "no_entry",
        "does not define",
    ),
    ("entry_not_function", "solution = 42\n", "solution", "no_entry", "not a function"),
    ("assert_false", S("assert 1 == 2, 'nope'"), "solution", "runtime", "AssertionError: nope"),
    ("unknown_name", S("return undefined_total + 1"), "solution", "runtime", "NameError"),
]


@pytest.fixture(scope="session")
def attack_results() -> dict[str, SandboxResult]:
    sb = Sandbox(FAST)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {aid: pool.submit(sb.run, src, entry) for aid, src, entry, _, _ in ATTACKS}
        return {aid: f.result() for aid, f in futures.items()}


def test_attack_list_is_large_and_unique():
    ids = [a[0] for a in ATTACKS]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("aid, source, entry, expected, pattern", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_contained(attack_results, aid, source, entry, expected, pattern):
    res = attack_results[aid]
    assert res.error_type in ERROR_TYPES or res.ok
    if expected == "validation|ok":  # either rejected as too deep or computed — never a crash
        assert res.ok or res.error_type == "validation", res
        return
    assert not res.ok, f"{aid} was not contained: {res}"
    if pattern == "MemoryError" and res.error_type == "timeout":
        # An attack that grows memory step by step is contained by whichever limit it reaches first; on a
        # loaded CI machine the wall clock can win over RLIMIT_AS. Both kill it.
        return
    assert res.error_type == expected, f"{aid}: {res.error_type}: {res.message}"
    assert re.search(pattern, res.message or ""), f"{aid}: {res.message!r} !~ {pattern!r}"
    assert REPO not in (res.message or ""), "host paths leak into the message"
    assert "/work" not in (res.message or "") and "site-packages" not in (res.message or "")
    assert res.to_json().startswith('{"ok": false, "error_type": "')


def test_each_attack_has_a_line_when_it_is_the_programs_fault(attack_results):
    for aid in (
        "zero_division",
        "unbounded_recursion",
        "pow_tower",
        "dunder_import_os_system",
        "syntax_error",
    ):
        assert isinstance(attack_results[aid].line, int), aid


def test_output_capture_keeps_what_fit(attack_results):
    res = attack_results["print_flood_loop"]
    assert res.stdout.startswith("0\n1\n2\n") and 60000 < len(res.stdout.encode()) <= 65536


def test_forged_result_text_stays_in_stdout(attack_results):
    res = attack_results["forged_result_line"]
    assert res.stdout == '{"ok": true, "value": 1}\n' and not res.ok


# ------------------------------------------------------------------------------------ legit programs
def pal_exemplars() -> list[str]:
    text = PAL_PROMPT.read_text(encoding="utf-8")
    blocks = re.findall(r"^def solution\(\):\n(?:(?:    .*)?\n)+?    return result\n", text, flags=re.M)
    return blocks


# (id, source, entry, expected value)
LEGIT: list[tuple[str, str, str | None, object]] = [
    (
        "loop_accumulate",
        S("total = 0\nfor day in range(1, 8):\n    total += day * 3\nreturn total"),
        "solution",
        84,
    ),
    (
        "list_comprehension",
        S("prices = [3, 5, 8]\nreturn sum([p * 2 for p in prices if p > 3])"),
        "solution",
        26,
    ),
    ("divmod_leftover", S("boxes, left = divmod(100, 12)\nreturn left"), "solution", 4),
    ("round_money", S("return round(17.5 * 1.2, 2)"), "solution", 21.0),
    ("math_floor_ceil", "import math\n" + S("return math.floor(7 / 2) + math.ceil(7 / 2)"), "solution", 7),
    ("import_inside_function", S("import math\nreturn math.sqrt(144) + math.pi * 0"), "solution", 12.0),
    ("fraction_exact", "from fractions import Fraction\n" + S("return Fraction(3, 4) * 20"), "solution", 15),
    (
        "fraction_non_integer",
        "from fractions import Fraction\n" + S("return Fraction(1, 3) + Fraction(1, 6)"),
        "solution",
        0.5,
    ),
    ("percent_discount", S("price = 80\ndiscount = 0.25\nreturn price * (1 - discount)"), "solution", 60.0),
    (
        "while_doubling",
        S("n, days = 1, 0\nwhile n < 1000:\n    n *= 2\n    days += 1\nreturn days"),
        "solution",
        10,
    ),
    (
        "dict_prices",
        S(
            "prices = {'apple': 2, 'pear': 3}\nqty = {'apple': 4, 'pear': 1}\n"
            "return sum(prices[k] * q for k, q in qty.items())"
        ),
        "solution",
        11,
    ),
    (
        "helper_function",
        "def cost(n, each):\n    return n * each\n\n" + S("return cost(4, 2.5) + cost(2, 1)"),
        "solution",
        12.0,
    ),
    ("fstring_print", S("total = 12.5\nprint(f'total: {total:.2f}')\nreturn total"), "solution", 12.5),
    (
        "sorted_max_min",
        S("xs = [4, -9, 2]\nreturn [sorted(xs), max(xs, key=abs), min(xs)]"),
        "solution",
        [[-9, 2, 4], -9, -9],
    ),
    ("statistics_mean", "import statistics\n" + S("return statistics.mean([2, 4, 9])"), "solution", 5),
    (
        "date_difference",
        "from datetime import date\n" + S("return (date(2024, 3, 1) - date(2024, 2, 1)).days"),
        "solution",
        29,
    ),
    (
        "decimal_quantize",
        "from decimal import Decimal, ROUND_HALF_UP\n"
        + S("d = Decimal('2.675').quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)\nreturn float(d)"),
        "solution",
        2.68,
    ),
    ("module_answer", "a = 15\nb = 21\nanswer = b - a\n", None, 6),
    (
        "tuple_swap_enumerate_zip",
        S(
            "x, y = 1, 2\nx, y = y, x\nacc = 0\nfor i, (a, b) in enumerate(zip([1, 2], [3, 4])):"
            "\n    acc += i + a * b\nreturn [x, y, acc]"
        ),
        "solution",
        [2, 1, 12],
    ),
    ("underscore_loop", S("count = 0\nfor _ in range(3):\n    count += 2\nreturn count"), "solution", 6),
    ("str_methods", S("s = '3,200 dollars'\nreturn int(s.split()[0].replace(',', ''))"), "solution", 3200),
    (
        "walrus_and_annotations",
        "def solution() -> float:\n    if (n := 10) > 5:\n        rate: float = 0.5\n"
        "        return n * rate\n    return 0.0\n",
        "solution",
        5.0,
    ),
    (
        "recursion_fib",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" + S("return fib(15)"),
        "solution",
        610,
    ),
    ("power_and_sqrt", S("return [2 ** 10, 9 ** 0.5, 10 ** -2]"), "solution", [1024, 3.0, 0.01]),
    ("big_but_allowed_int", S("return len(str(2 ** 10000))"), "solution", 3011),
    (
        "nested_dict_value",
        S("return {'total': 5, 'parts': [2, 3], 'ok': True, 'none': None}"),
        "solution",
        {"total": 5, "parts": [2, 3], "ok": True, "none": None},
    ),
    ("set_and_tuple_values", S("return [{3, 1, 2}, (1, 2)]"), "solution", [[1, 2, 3], [1, 2]]),
    (
        "docstring_and_comments",
        S('"""Question text."""\n# comment\nresult = 7  # trailing\nreturn result'),
        "solution",
        7,
    ),
    (
        "isinstance_and_int_float",
        S("x = 7.0\nreturn int(x) if isinstance(x, float) and x.is_integer() else x"),
        "solution",
        7,
    ),
    ("non_finite_float", S("return float('inf')"), "solution", "inf"),
    (
        "strptime_weekday",
        "from datetime import datetime\n" + S("return datetime.strptime('2024-03-01', '%Y-%m-%d').weekday()"),
        "solution",
        4,
    ),
    ("lone_surrogate_in_value", S("return chr(0xD800) + 'x'"), "solution", "\ufffdx"),
    (
        "date_strftime_and_today",
        "from datetime import date\n"
        + S("return [date(2024, 3, 1).strftime('%A'), date.today().year > 2000]"),
        "solution",
        ["Friday", True],
    ),
    (
        "main_guard_footer",
        S("return 5") + 'if __name__ == "__main__":\n    print(solution())\n',
        "solution",
        5,
    ),
    (
        "statistics_regression_fields",
        "import statistics\n"
        + S("fit = statistics.linear_regression([1, 2, 3], [2, 4, 6])\nreturn [fit.slope, fit.intercept]"),
        "solution",
        [2.0, 0.0],
    ),
    ("unicode_identifier", S("π = 3.14159\nr = 2\nreturn round(π * r ** 2, 2)"), "solution", 12.57),
]


@pytest.fixture(scope="session")
def legit_results() -> dict[str, SandboxResult]:
    sb = Sandbox(FAST)
    progs = {f"pal_exemplar_{i}": (src, "solution") for i, src in enumerate(pal_exemplars())}
    progs.update({lid: (src, entry) for lid, src, entry, _ in LEGIT})
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {k: pool.submit(sb.run, src, entry) for k, (src, entry) in progs.items()}
        return {k: f.result() for k, f in futures.items()}


def test_all_eight_pal_exemplars_run(legit_results):
    exemplars = pal_exemplars()
    assert len(exemplars) == 8
    # the paper's answers to its own exemplar questions
    expected = [8, 33, 29, 9, 8, 39, 5, 6]
    got = [legit_results[f"pal_exemplar_{i}"] for i in range(8)]
    assert [r.ok for r in got] == [True] * 8, [r.message for r in got if not r.ok]
    assert [r.value for r in got] == expected


@pytest.mark.parametrize("lid, source, entry, expected", LEGIT, ids=[p[0] for p in LEGIT])
def test_legit_program_runs(legit_results, lid, source, entry, expected):
    res = legit_results[lid]
    assert res.ok, f"{lid} was blocked: {res.error_type}: {res.message}"
    assert res.value == expected
    assert res.to_json().startswith('{"ok": true, "value": ')


def test_print_output_is_captured(legit_results):
    assert legit_results["fstring_print"].stdout == "total: 12.50\n"


# ------------------------------------------------------------------------------------ behaviour
@pytest.fixture(scope="module")
def sb() -> Sandbox:
    return Sandbox(FAST)


def test_one_failure_never_affects_the_next_run(sb):
    good = S("return 6 * 7")
    for bad in (
        "__import__('os')",
        S("while True:\n    pass"),
        S("return 10**10**10"),
        S("x = 'a' * 9000000\nys = [x + str(i) for i in range(200)]\nreturn 1"),
    ):
        assert not sb.run(bad).ok
        res = sb.run(good)
        assert res.ok and res.value == 42


def test_cpu_limit_is_a_timeout():
    res = Sandbox(SandboxLimits(wall_seconds=10, cpu_seconds=1)).run(S("while True:\n    pass"))
    assert res.error_type == "timeout" and "CPU" in res.message
    assert res.seconds < 5


def test_cancel_kills_a_running_child(sb):
    box: dict[str, SandboxResult] = {}
    t = threading.Thread(target=lambda: box.update(r=sb.run(S("while True:\n    pass"))))
    t.start()
    for _ in range(200):
        if sb.running_pids():
            break
        time.sleep(0.01)
    pids = sb.running_pids()
    time.sleep(0.1)
    assert sb.cancel() == 1
    t.join(5)
    assert box["r"].error_type == "cancelled" and box["r"].seconds < 2
    assert sb.running_pids() == []
    for pid in pids:
        assert not _alive(pid)


def test_keyboard_interrupt_kills_the_process_group_and_propagates(sb):
    """A real SIGINT to the main thread (what Ctrl-C in the REPL delivers) while run() waits."""
    import signal

    seen: list[int] = []
    main = threading.main_thread().ident

    def interrupt():
        for _ in range(300):
            if sb.running_pids():
                seen.extend(sb.running_pids())
                break
            time.sleep(0.01)
        time.sleep(0.1)
        signal.pthread_kill(main, signal.SIGINT)

    # what a terminal's Ctrl-C meets in an interactive process (a background job of a script starts with SIGINT
    # ignored, which would make this test meaningless)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            sb.run(S("while True:\n    pass"))
    finally:
        signal.signal(signal.SIGINT, old)
    assert time.perf_counter() - t0 < 2.5
    assert seen and sb.running_pids() == []
    assert not _alive(seen[0])
    assert sb.run(S("return 1")).value == 1  # and the sandbox still works


def _alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_concurrent_runs_on_one_sandbox(sb):
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda n: sb.run(S(f"return {n} * {n}")), range(12)))
    assert [r.value for r in results] == [n * n for n in range(12)]


def test_entry_and_module_modes(sb):
    assert sb.run("def main():\n    return 'hi'\n", entry="main").value == "hi"
    assert sb.run("x = 2\n", entry=None).value is None  # no `answer` variable
    with pytest.raises(UsageError, match="not a valid function name"):
        sb.run("x = 1", entry="os.system")
    with pytest.raises(UsageError, match="must be a str"):
        sb.run(b"x = 1")  # type: ignore[arg-type]


def test_result_json_shapes(sb):
    ok = sb.run(S("return [1, 2]"))
    assert ok.to_json() == '{"ok": true, "value": [1, 2]}'
    assert ok.to_dict() == {"ok": True, "value": [1, 2]} and ok.observation() == "[1, 2]"
    bad = sb.run("import os")
    assert bad.to_dict() == {"ok": False, "error_type": "validation", "message": bad.message}
    assert bad.observation().startswith("error (validation): line 1: import of 'os'")


def test_child_sees_no_environment_and_an_empty_cwd_is_removed(sb, monkeypatch, tmp_path):
    # the program itself cannot look at either; check the host's side: no temp dirs are left behind
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert sb.run(S("return 1")).ok and sb.run("import os").error_type == "validation"
    assert list(tmp_path.iterdir()) == []


def test_limits_are_validated():
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxLimits(memory_mb=1)
    with pytest.raises(ConfigError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ConfigError, match="cpu_seconds"):
        SandboxLimits(cpu_seconds=0)
