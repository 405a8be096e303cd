"""Sandbox internals: the allow-list in-process (fast, literal programs), the limits the child really
sets, the guard arithmetic, and the host's defences against a misbehaving child (fake interpreters that
flood stdout, hang with closed pipes, crash, or leave a grandchild behind)."""

from __future__ import annotations

import ast
import builtins
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ragloop.agents.sandbox import Sandbox, SandboxLimits
from ragloop.agents.sandbox import _worker as worker
from ragloop.agents.sandbox.host import WORKER_PATH, _parse_result, check_source
from ragloop.agents.sandbox.validator import (
    ALLOWED_ATTRIBUTES,
    ALLOWED_BUILTINS,
    ALLOWED_MODULES,
    ProgramRejected,
    bound_names,
    rewrite,
    validate,
)


def rejects(src: str) -> str:
    with pytest.raises(ProgramRejected) as err:
        validate(ast.parse(src))
    return str(err.value)


# ------------------------------------------------------------------------------------ validator
def test_python_nfkc_normalises_identifiers_before_we_see_them():
    tree = ast.parse("ｏｐｅｎ\nx.ｆｏｒｍａｔ\nℌ = 1")
    names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    assert names == ["open", "H", "x"] or sorted(names) == ["H", "open", "x"]
    assert attrs == ["format"]
    assert "'open' is not available" in rejects("ｏｐｅｎ('f')")
    assert "'format'" in rejects("'{}'.ｆｏｒｍａｔ(1)")
    assert "'__class__'" in rejects("().__ｃｌａｓｓ__")


@pytest.mark.parametrize(
    "src, fragment",
    [
        ("class A: pass", "classes"),
        ("f = lambda: 1", "lambda"),
        ("try:\n    pass\nexcept Exception:\n    pass", "try/except"),
        ("with x: pass", "with"),
        ("raise ValueError", "raise"),
        ("def f():\n    global x", "global"),
        ("def f():\n    x = 1\n    def g():\n        nonlocal x", "nonlocal"),
        ("def g():\n    yield 1", "yield"),
        ("def g():\n    yield from []", "yield from"),
        ("async def f(): pass", "async"),
        ("@dec\ndef f(): pass", "decorators"),
        ("import os", "import of 'os'"),
        ("import math.x", "import of 'math.x'"),
        ("from math import _x", "math._x"),
        ("from math import floor as _f", "'_f'"),
        ("from .math import floor", "relative"),
        ("x.__dict__", "'__dict__'"),
        ("x.gi_frame", "'gi_frame'"),
        ("x.f_globals", "'f_globals'"),
        ("x.tb_frame", "'tb_frame'"),
        ("x.co_consts", "'co_consts'"),
        ("x.cr_frame", "'cr_frame'"),
        ("x.mro()", "'mro'"),
        ("x.format_map({})", "'format_map'"),
        ("x.real = 1", "setting or deleting"),
        ("del x.real", "setting or deleting"),
        ("def _f(): pass", "function name '_f'"),
        ("def f(__a): pass", "'__a'"),
        ("f(__a=1)", "'__a'"),
        ("_a = 1", "'_a'"),
        ("__name__ = 1", "'__name__'"),
        ("__file__", "'__file__'"),
        ("a[1:2] *= 3", "slice"),
        ("x = [1] @ [2]", "@"),
        ("print(f'{x:{y}}')", "constants"),
        ("print(f'{x:>100000}')", "too large"),
        ("getattr(x, 'y')", "'getattr'"),
        ("type(x)", "'type'"),
    ],
)
def test_validator_rejects(src, fragment):
    assert fragment in rejects(src)


def test_validator_reports_the_first_problem_in_reading_order():
    msg = rejects("x = 1\n__import__('os').system('id')\nclass A: pass")
    assert msg.startswith("line 2:") and "__import__" in msg


def test_validator_allows_shadowing_an_unavailable_builtin():
    validate(ast.parse("type = 'apple'\ncount = len(type)\nid = 3\nanswer = id + count"))
    assert bound_names(ast.parse("for i, (a, b) in x: pass\n[y for y in z]\n(w := 1)")) >= {
        "i",
        "a",
        "b",
        "y",
        "w",
    }


def test_validator_accepts_the_allowed_vocabulary():
    validate(
        ast.parse(
            textwrap.dedent("""
        import math, fractions, decimal, statistics, datetime
        from math import floor, ceil as up
        def solution(a=1, *args, b: int = 2, **kw) -> float:
            '''doc'''
            xs = [i * i for i in range(10) if i % 2]
            d = {k: v for k, v in zip('ab', (1, 2))}
            s = {x for x in xs}
            t = sum(x for x in xs) // 3 ** 2 << 1 >> 1 | 1 & 3 ^ 2
            while t > 0:
                t -= 1
                if t == 5:
                    break
                elif t == 7:
                    continue
            else:
                pass
            del d['a']
            assert xs, 'empty'
            n = -t if not xs else +t
            y = xs[1:3] + xs[::2]
            return f'{n:.2f} {y!r}'
        """)
        )
    )


def test_allow_lists_contain_nothing_dangerous():
    dangerous = {
        "format",
        "format_map",
        "mro",
        "eval",
        "exec",
        "open",
        "getattr",
        "setattr",
        "globals",
        "locals",
        "vars",
        "compile",
        "type",
        "object",
        "input",
        "breakpoint",
        "memoryview",
        "from_bytes",
        "to_bytes",
        "encode",
        "decode",
        "system",
        "subclasses",
    }
    assert not (ALLOWED_ATTRIBUTES | ALLOWED_BUILTINS) & dangerous
    assert not any(a.startswith(("_", "f_", "co_", "gi_", "tb_", "cr_", "ag_")) for a in ALLOWED_ATTRIBUTES)
    assert set(ALLOWED_MODULES) == {"math", "fractions", "decimal", "statistics", "datetime"}
    assert all(hasattr(builtins, b) for b in ALLOWED_BUILTINS)


def test_module_allow_lists_name_only_real_public_non_module_objects():
    import importlib
    import types

    for mod_name, names in ALLOWED_MODULES.items():
        mod = importlib.import_module(mod_name)
        present = [n for n in names if hasattr(mod, n)]
        assert len(present) >= len(names) * 0.7, mod_name  # a few names are version-dependent
        for n in present:
            assert not isinstance(getattr(mod, n), types.ModuleType), f"{mod_name}.{n} is a module"


def test_rewrite_guards_power_shift_and_multiply():
    out = ast.unparse(rewrite(ast.parse("a = 2 ** 3 << 1\nb *= 4\nc[i] **= 2\nd = 1 + 2")))
    assert out.splitlines() == [
        "a = __rl_binop('<<', __rl_binop('**', 2, 3), 1)",
        "b = __rl_binop('*', b, 4)",
        "__rl_augitem('**', c, i, 2)",
        "d = 1 + 2",
    ]


# ------------------------------------------------------------------------------------ worker pieces
def test_guards_estimate_before_computing():
    g = worker.Guards({"max_int_digits": 100, "max_sequence_len": 50, "max_range": 1000})
    assert g.binop("**", 10, 99) == 10**99
    with pytest.raises(worker.SizeLimitExceeded):
        g.binop("**", 10, 101)
    assert g.binop("**", 2.0, 10) == 1024.0 and g.binop("**", -1, 10**12) == 1
    with pytest.raises(worker.SizeLimitExceeded):
        g.binop("<<", 1, 400)
    with pytest.raises(worker.SizeLimitExceeded):
        g.binop("*", 10**60, 10**60)
    assert g.binop("*", "ab", 25) == "ab" * 25
    with pytest.raises(worker.SizeLimitExceeded):
        g.binop("*", 26, "ab")
    assert g.binop("*", [1], -5) == []
    with pytest.raises(worker.SizeLimitExceeded):
        g.range(1001)
    with pytest.raises(worker.SizeLimitExceeded):
        g.range(10**30)
    assert list(g.range(0, 10, 3)) == [0, 3, 6, 9]
    assert g.pow(3, 4, 5) == 81 % 5 and g.factorial(10) == 3628800
    with pytest.raises(worker.SizeLimitExceeded):
        g.factorial(100)


def test_to_jsonable_conversions():
    from datetime import date, timedelta
    from decimal import Decimal
    from fractions import Fraction

    conv = worker.to_jsonable
    assert conv(Fraction(3, 1)) == 3 and conv(Fraction(1, 4)) == 0.25
    assert conv(Decimal("2.50")) == 2.5 and conv(Decimal("4.00")) == 4
    assert conv(float("nan")) == "nan" and conv(float("-inf")) == "-inf"
    assert conv({1: (1, 2), None: {3}, 2.5: True}) == {"1": [1, 2], "null": [3], "2.5": True}
    assert conv(date(2024, 1, 2)) == "2024-01-02" and conv(timedelta(hours=2)) == "2:00:00"
    for bad in (print, object(), 1j, {(1, 2): 3}):
        with pytest.raises(TypeError):
            conv(bad)
    with pytest.raises(ValueError, match="more than"):
        conv(list(range(20000)))


def test_check_source_and_parse_result():
    lim = SandboxLimits()
    assert check_source("x = 1\n" * 10, lim) is None
    assert "NUL" in check_source("\x00", lim)
    assert "20001 bytes" in check_source("x" * 20001, lim)
    assert "é" and check_source("é" * 10000, lim) is None and "bytes" in check_source("é" * 10001, lim)
    assert _parse_result(b'{"ok": true, "value": 1, "stdout": ""}\n') == {
        "ok": True,
        "value": 1,
        "stdout": "",
    }
    for junk in (
        b"",
        b"not json",
        b'{"ok": "yes"}',
        b'{"ok": false, "error_type": "pwned"}',
        b"[1]",
        b'{"ok": true}\n{"ok": true}',
    ):
        assert _parse_result(junk) is None


def test_child_applies_its_limits_before_reading_the_program():
    """Run the real worker module's apply_limits in an isolated interpreter and read the limits back."""
    cfg = SandboxLimits(memory_mb=256, cpu_seconds=3, max_int_digits=1000).to_worker("solution")
    probe = (
        "import json, resource, sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('w', {str(WORKER_PATH)!r})\n"
        "w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)\n"
        "w.apply_limits(json.loads(sys.argv[1]))\n"
        "R = resource\n"
        "print(json.dumps({n: R.getrlimit(getattr(R, n)) for n in "
        "['RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_NPROC', 'RLIMIT_NOFILE', 'RLIMIT_CORE']}"
        " | {'digits': sys.get_int_max_str_digits(), 'nobytecode': sys.dont_write_bytecode}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env={},
        timeout=30,
        check=True,
    ).stdout
    got = json.loads(out)
    assert got["RLIMIT_AS"] == [256 * 2**20] * 2
    assert got["RLIMIT_CPU"] == [3, 4]
    assert got["RLIMIT_FSIZE"] == [0, 0] and got["RLIMIT_NPROC"] == [0, 0] and got["RLIMIT_CORE"] == [0, 0]
    assert got["RLIMIT_NOFILE"] == [16, 16]
    assert got["digits"] == 1000 and got["nobytecode"] is True


def test_worker_file_imports_only_the_standard_library():
    tree = ast.parse(WORKER_PATH.read_text(encoding="utf-8"))
    validator_src = (WORKER_PATH.parent / "validator.py").read_text(encoding="utf-8")
    mods = set()
    for src_tree in (tree, ast.parse(validator_src)):
        for node in ast.walk(src_tree):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module.split(".")[0])
    assert mods <= set(sys.stdlib_module_names) | {"__future__", "validator"}, (
        mods
    )  # validator: the sibling file


# ------------------------------------------------------------------------------------ host defences
def fake_python(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the interpreter (it ignores the worker arguments)."""
    path = tmp_path / "fake_python"
    path.write_text(
        f"#!{sys.executable}\nimport os, sys, time, signal, subprocess\n{textwrap.dedent(body)}\n"
    )
    path.chmod(0o755)
    return str(path)


def test_host_caps_a_flooding_child(tmp_path):
    py = fake_python(tmp_path, "while True:\n    os.write(1, b'x' * 65536)\n")
    t0 = time.perf_counter()
    res = Sandbox(SandboxLimits(wall_seconds=5), python=py).run("x = 1")
    assert res.error_type == "output_limit" and time.perf_counter() - t0 < 4


def test_host_times_out_a_child_that_closed_its_pipes(tmp_path):
    py = fake_python(tmp_path, "os.close(1); os.close(2)\ntime.sleep(60)\n")
    res = Sandbox(SandboxLimits(wall_seconds=1), python=py).run("x = 1")
    assert res.error_type == "timeout" and res.seconds < 3


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("sys.exit(7)", "exit code 7"),
        ("os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
        ("print('garbage')", "exit code 0"),
        ('print(\'{"ok": false, "error_type": "made-up"}\')', "exit code 0"),
        (
            "sys.stderr.write('Traceback\\n  File \"/secret/dir/x.py\"\\nBoom: /secret/dir/x.py broke\\n'); sys.exit(1)",
            "Boom: <path> broke",
        ),
    ],
)
def test_host_maps_a_broken_child_to_crashed(tmp_path, body, fragment):
    res = Sandbox(SandboxLimits(wall_seconds=5), python=fake_python(tmp_path, body)).run("x = 1")
    assert res.error_type == "crashed" and fragment in res.message and "/secret" not in res.message


def test_host_kills_the_whole_process_group(tmp_path):
    """A child that leaves a grandchild behind: after run() returns, the grandchild is dead too."""
    pidfile = tmp_path / "grandchild.pid"
    py = fake_python(
        tmp_path,
        f"p = subprocess.Popen(['{sys.executable}', '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        'print(\'{"ok": true, "value": 1, "stdout": ""}\')\n',
    )
    res = Sandbox(SandboxLimits(wall_seconds=5), python=py).run("x = 1")
    assert res.ok and res.value == 1  # (a fake child can claim anything; the point is the cleanup)
    gpid = int(pidfile.read_text())
    for _ in range(100):
        stat = Path(f"/proc/{gpid}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            break
        time.sleep(0.01)
    else:
        pytest.fail("the grandchild survived the run")


def test_missing_interpreter_is_a_clear_error(tmp_path):
    from ragloop.core.errors import SandboxError

    with pytest.raises(SandboxError, match="cannot start the sandbox interpreter"):
        Sandbox(python=str(tmp_path / "nope")).run("x = 1")


def test_a_program_larger_than_the_pipe_buffer_is_written_in_pieces():
    lines = [f"v{i} = {i}" for i in range(12000)]
    source = "\n".join(lines) + "\nanswer = v11999 + v0\n"
    assert len(source.encode()) > 2 * 65536
    limits = SandboxLimits(max_source_bytes=400_000, max_source_lines=20_000, wall_seconds=20, cpu_seconds=10)
    res = Sandbox(limits).run(source, entry=None)
    assert res.ok and res.value == 11999
