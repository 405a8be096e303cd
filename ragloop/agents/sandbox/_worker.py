"""The sandbox child: a stdlib-only program run as ``python -I -S -B _worker.py '<settings json>'``.

Protocol (SECURITY.md §1): the host starts this file in a fresh process group with an empty environment
and an empty temporary working directory. It then

1. sets resource limits (address space, CPU seconds, file size 0, no new processes, few open files,
   int-string digits, recursion) **before** reading anything from stdin;
2. reads the program (UTF-8) from stdin, parses it, validates the tree against the allow-list in
   ``validator.py`` (loaded by file path, since ``-I`` keeps this directory off ``sys.path``), rewrites
   ``**``/``<<``/``*`` into size-guarded calls, and compiles it;
3. executes it with a small explicit builtins dict, restricted module proxies and a captured ``print``;
4. writes exactly one JSON line to stdout — ``{"ok", "value", "stdout", "error_type", "message",
   "line"}`` — and leaves with ``os._exit``. Nothing else ever writes to this process's stdout: the
   program's ``print`` goes to a capped in-memory buffer carried inside that JSON line.

This file must not import anything outside the standard library (no ragloop, no site-packages).
"""

import ast
import json
import math
import os
import re
import resource
import signal
import sys

PROGRAM_FILENAME = "<program>"
EXIT_MEMORY = 3  # the worker ran out of memory even while reporting; the host maps it to "memory"
EXIT_INTERNAL = 5
_LOG10_2 = math.log10(2)
_MAX_MESSAGE = 600
_MAX_VALUE_ITEMS = 10_000
_MAX_VALUE_DEPTH = 20
# Modules that allowed modules' C code imports at run time through the program's __import__.
_C_INTERNAL_IMPORTS = frozenset({"time", "_strptime"})
_SURROGATES = re.compile("[\ud800-\udfff]")


class _Abort(BaseException):
    """Stops the program with a typed error. A BaseException, and the program has no ``try``, so user
    code cannot swallow it."""

    error_type = "runtime"


class SizeLimitExceeded(_Abort):
    error_type = "memory"


class OutputLimitExceeded(_Abort):
    error_type = "output_limit"


class CpuLimitExceeded(_Abort):
    error_type = "timeout"


# ---------------------------------------------------------------------------------------------------
# limits


def _set_limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def apply_limits(cfg: dict) -> None:
    """Process limits, set before the program is read. RLIMIT_NPROC does not bind for root (the kernel
    exempts CAP_SYS_RESOURCE/CAP_SYS_ADMIN); the allow-list is what keeps a program from forking."""
    sys.dont_write_bytecode = True
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing us

    def on_xcpu(signum, frame):  # soft CPU limit reached: stop the program with a typed error
        raise CpuLimitExceeded(f"CPU time limit of {cfg['cpu_seconds']} s exceeded")

    signal.signal(signal.SIGXCPU, on_xcpu)
    _set_limit(resource.RLIMIT_CORE, 0)
    mem = int(cfg["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(cfg["cpu_seconds"])
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    hard_new = cpu + 1 if hard == resource.RLIM_INFINITY else min(cpu + 1, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (min(cpu, hard_new), hard_new))
    _set_limit(resource.RLIMIT_FSIZE, 0)
    _set_limit(resource.RLIMIT_NPROC, 0)
    _set_limit(resource.RLIMIT_NOFILE, int(cfg["max_open_files"]))
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(max(640, int(cfg["max_int_digits"])))


# ---------------------------------------------------------------------------------------------------
# guards the rewritten program calls


def _fraction_type():
    mod = sys.modules.get("fractions")
    return mod.Fraction if mod is not None else None


def _log10_magnitude(x):
    """log10 of |x| for ints and Fractions (None for other types, whose size cannot explode)."""
    if isinstance(x, int):
        return math.log10(abs(x)) if x else 0.0
    frac = _fraction_type()
    if frac is not None and isinstance(x, frac):
        num, den = abs(x.numerator), x.denominator
        return max(math.log10(num) if num else 0.0, math.log10(den))
    return None


class Guards:
    """Size-guarded replacements for the operations that can explode (one instance per run)."""

    def __init__(self, cfg: dict) -> None:
        self.max_digits = int(cfg["max_int_digits"])
        self.max_seq = int(cfg["max_sequence_len"])
        self.max_range = int(cfg["max_range"])

    def _too_big(self, what: str, digits: float) -> SizeLimitExceeded:
        return SizeLimitExceeded(
            f"{what} would give a number with about {digits:.3g} digits; the limit is {self.max_digits}"
        )

    def binop(self, op: str, a, b):
        if op == "**":
            exp = b
            frac = _fraction_type()
            exact = frac is not None and (isinstance(a, frac) or isinstance(b, frac))
            if frac is not None and isinstance(b, frac) and b.denominator == 1:
                exp = b.numerator  # Fraction.__pow__/__rpow__ compute whole exponents exactly
            # int ** negative int is a float (cannot explode); a Fraction raised to a negative whole power is
            # exact (1/x)**|n|, as large as x**|n|: Fraction(2, 3) ** -(10**9) used to run into the timeout
            if isinstance(exp, int) and (exp > 1 or (exact and exp < -1)):
                exp = abs(exp)
                mag = _log10_magnitude(a)
                if mag is not None and mag * exp > self.max_digits:
                    raise self._too_big("**", mag * exp)
            return a**b
        if op == "<<":
            if isinstance(a, int) and isinstance(b, int) and a and b > 0:
                digits = (a.bit_length() + b) * _LOG10_2
                if digits > self.max_digits:
                    raise self._too_big("<<", digits)
            return a << b
        # op == "*"
        mag_a, mag_b = _log10_magnitude(a), _log10_magnitude(b)
        if mag_a is not None and mag_b is not None:
            if mag_a + mag_b > self.max_digits:
                raise self._too_big("*", mag_a + mag_b)
        elif isinstance(b, int) and isinstance(a, (str, bytes, list, tuple)):
            self._check_repeat(len(a), b)
        elif isinstance(a, int) and isinstance(b, (str, bytes, list, tuple)):
            self._check_repeat(len(b), a)
        return a * b

    def _check_repeat(self, length: int, times: int) -> None:
        if times > 0 and length * times > self.max_seq:
            raise SizeLimitExceeded(
                f"repeating a sequence of length {length} {times} times would exceed the limit of "
                f"{self.max_seq} items"
            )

    def augitem(self, op: str, container, key, value) -> None:
        container[key] = self.binop(op, container[key], value)

    def pow(self, base, exp, mod=None):
        if mod is None:
            return self.binop("**", base, exp)
        return pow(base, exp, mod)

    def round(self, number, ndigits=None):
        if ndigits is None:
            return round(number)
        if isinstance(ndigits, int) and abs(ndigits) > self.max_digits:
            raise SizeLimitExceeded(f"round() with ndigits={ndigits} exceeds the limit of {self.max_digits}")
        return round(number, ndigits)

    def range(self, *args):
        r = range(*args)
        try:
            n = len(r)
        except OverflowError:
            n = self.max_range + 1
        if n > self.max_range:
            raise SizeLimitExceeded(f"range() of more than {self.max_range} items is not allowed")
        return r

    # guarded module functions -------------------------------------------------------------------
    def factorial(self, n):
        if isinstance(n, int) and n > 1 and math.lgamma(n + 1) / math.log(10) > self.max_digits:
            raise self._too_big("factorial()", math.lgamma(n + 1) / math.log(10))
        return math.factorial(n)

    def comb(self, n, k):
        if isinstance(n, int) and isinstance(k, int) and 0 <= k <= n:
            digits = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(10)
            if digits > self.max_digits:
                raise self._too_big("comb()", digits)
        return math.comb(n, k)

    def perm(self, n, k=None):
        if isinstance(n, int) and n >= 0 and (k is None or (isinstance(k, int) and 0 <= k <= n)):
            kk = n if k is None else k
            digits = (math.lgamma(n + 1) - math.lgamma(n - kk + 1)) / math.log(10)
            if digits > self.max_digits:
                raise self._too_big("perm()", digits)
        return math.perm(n, k)

    def prod(self, iterable, *, start=1):
        result = start
        for x in iterable:
            result = self.binop("*", result, x)
        return result

    def lcm(self, *ints):
        digits = sum(_log10_magnitude(i) or 0.0 for i in ints if isinstance(i, int))
        if digits > self.max_digits:
            raise self._too_big("lcm()", digits)
        return math.lcm(*ints)

    def _check_decimal(self, d):
        if d.is_finite() and abs(d.adjusted()) > self.max_digits:
            raise SizeLimitExceeded(
                f"Decimal with exponent {d.adjusted()} exceeds the limit of {self.max_digits}"
            )
        return d

    def make_decimal(self):
        import decimal

        ctx = decimal.getcontext()  # exponents beyond the digit cap trap as decimal.Overflow
        ctx.Emax = self.max_digits
        ctx.Emin = -self.max_digits
        real = decimal.Decimal
        guards = self

        def Decimal(value="0"):  # noqa: N802 - keeps the name users write
            return guards._check_decimal(real(value))

        def from_float(f):
            return guards._check_decimal(real.from_float(f))

        Decimal.from_float = from_float
        return Decimal

    def make_fraction(self):
        import decimal
        import fractions

        real = fractions.Fraction
        guards = self

        def Fraction(numerator=0, denominator=None):  # noqa: N802
            for arg in (numerator, denominator):
                if isinstance(arg, str):
                    guards._check_fraction_text(arg)
                elif isinstance(arg, decimal.Decimal):
                    guards._check_decimal(arg)
            return real(numerator, denominator)

        Fraction.from_float = real.from_float

        def from_decimal(d):
            return real.from_decimal(guards._check_decimal(d))

        Fraction.from_decimal = from_decimal
        return Fraction

    def _check_fraction_text(self, text: str) -> None:
        low = text.strip().lower()
        if "e" in low:
            exp_text = low.rsplit("e", 1)[1]
            try:
                exp = int(exp_text)
            except ValueError:
                return  # Fraction itself rejects the malformed string
            if abs(exp) > self.max_digits:
                raise SizeLimitExceeded(
                    f"Fraction({text[:40]!r}) exceeds the limit of {self.max_digits} digits"
                )


# ---------------------------------------------------------------------------------------------------
# captured print


class Capture:
    """The program's printed output, capped at ``limit`` UTF-8 bytes (then the run stops)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0

    def write(self, text: str) -> None:
        n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if self.size + n > self.limit:
            room = self.limit - self.size
            if room > 0:
                self.parts.append(text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore"))
            self.size = self.limit
            raise OutputLimitExceeded(f"the program printed more than {self.limit} bytes")
        self.parts.append(text)
        self.size += n

    def text(self) -> str:
        return "".join(self.parts)

    def make_print(self):
        capture = self

        def print(*args, sep=" ", end="\n", file=None, flush=False):  # noqa: A001 - the user's print
            if file is not None:
                raise TypeError("print(file=...) is not available in the sandbox")
            if sep is None:
                sep = " "
            if end is None:
                end = "\n"
            if not isinstance(sep, str) or not isinstance(end, str):
                raise TypeError("sep and end must be strings")
            capture.write(sep.join(str(a) for a in args) + end)

        return print


# ---------------------------------------------------------------------------------------------------
# the restricted environment


def load_validator():
    """Import validator.py from this file's directory (``-I`` keeps that directory off ``sys.path``).
    The directory is on the path only for this one import, so nothing else can be shadowed by it."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        import validator  # noqa: PLC0415 - the sibling file, stdlib-only
    finally:
        sys.path.remove(here)
    return validator


def build_globals(validator, guards: Guards, capture: Capture) -> dict:
    SimpleNamespace = type(sys.implementation)  # noqa: N806 - types.SimpleNamespace without importing types
    proxies: dict = {}

    def module_proxy(name: str):
        if name in proxies:
            return proxies[name]
        module = __import__(name)
        names = {n: getattr(module, n) for n in validator.ALLOWED_MODULES[name] if hasattr(module, n)}
        if name == "math":
            names.update(
                factorial=guards.factorial, comb=guards.comb, perm=guards.perm, prod=guards.prod,
                lcm=guards.lcm,
            )  # fmt: skip
        elif name == "decimal":
            names["Decimal"] = guards.make_decimal()
        elif name == "fractions":
            names["Fraction"] = guards.make_fraction()
        elif name == "statistics":
            guards.make_decimal()  # statistics works on Decimals too: apply the exponent cap
        proxies[name] = SimpleNamespace(**names)
        return proxies[name]

    def sandbox_import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if level == 0 and name in _C_INTERNAL_IMPORTS and not fromlist:
            # datetime's C code imports these while the program runs (strftime, today, strptime); the
            # module goes back to that C code, never to the program (the validator rejects `import time`).
            return __import__(name)
        if level != 0 or name not in validator.ALLOWED_MODULES:
            raise ImportError(f"import of {name!r} is not allowed in the sandbox")
        return module_proxy(name)

    import builtins as real

    table = {name: getattr(real, name) for name in validator.ALLOWED_BUILTINS}
    table.update(
        pow=guards.pow,
        round=guards.round,
        range=guards.range,
        print=capture.make_print(),
        __import__=sandbox_import,
    )
    table[validator.BINOP_HELPER] = guards.binop
    table[validator.AUGITEM_HELPER] = guards.augitem
    return {"__builtins__": table, "__name__": "__sandbox__"}


# ---------------------------------------------------------------------------------------------------
# results


def _finite(x: float):
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_jsonable(value, depth: int = 0, budget: list | None = None):
    """Convert a return value to JSON data or raise TypeError/ValueError saying why it cannot be.

    Fraction -> int if whole else float; Decimal -> int if whole else float; non-finite floats -> "nan",
    "inf", "-inf"; tuple/set/range -> list (sets sorted when possible); dates -> ISO strings; timedelta
    -> str (e.g. "1 day, 2:00:00")."""
    if budget is None:
        budget = [_MAX_VALUE_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"the value has more than {_MAX_VALUE_ITEMS} items")
    if depth > _MAX_VALUE_DEPTH:
        raise TypeError(f"the value is nested deeper than {_MAX_VALUE_DEPTH} levels (or contains itself)")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _finite(value)
    frac_mod, dec_mod, dt_mod = (sys.modules.get(m) for m in ("fractions", "decimal", "datetime"))
    if frac_mod is not None and isinstance(value, frac_mod.Fraction):
        if value.denominator == 1:
            return int(value.numerator)
        try:
            return float(value)
        except OverflowError:
            return str(value)
    if dec_mod is not None and isinstance(value, dec_mod.Decimal):
        if not value.is_finite():
            return str(value).lower().replace("infinity", "inf")
        if value == value.to_integral_value():
            return int(value)
        return _finite(float(value))
    if dt_mod is not None:
        if isinstance(value, (dt_mod.date, dt_mod.time)):
            return value.isoformat()
        if isinstance(value, dt_mod.timedelta):
            return str(value)
    if isinstance(value, (list, tuple, range)):
        return [to_jsonable(v, depth + 1, budget) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [to_jsonable(v, depth + 1, budget) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, bool) or k is None or isinstance(k, (int, float)):
                k = json.dumps(k)  # JSON's own spelling: true, null, 3, 2.5
            elif not isinstance(k, str):
                raise TypeError(f"a dict key of type {type(k).__name__} is not a JSON key")
            out[k] = to_jsonable(v, depth + 1, budget)
        return out
    kind = "function" if callable(value) else type(value).__name__
    raise TypeError(
        f"the value is a {kind}, which is not a JSON value (return a number, string, bool, None, list or dict)"
    )


def _user_line(exc: BaseException):
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == PROGRAM_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _clip(text: str) -> str:
    text = text.replace(os.path.dirname(os.path.abspath(__file__)), "<sandbox>")
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        if prefix and len(prefix) > 1:
            text = text.replace(prefix, "<python>")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _failure(error_type: str, message: str, line=None) -> dict:
    return {"ok": False, "value": None, "error_type": error_type, "message": _clip(message), "line": line}


def _describe(exc: BaseException, source_lines: list) -> tuple:
    line = _user_line(exc)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, _Abort):
        text = str(exc)
    if line is not None:
        code = source_lines[line - 1].strip() if 0 < line <= len(source_lines) else ""
        text = f"line {line} ({code[:80]}): {text}" if code else f"line {line}: {text}"
    return text, line


def run_program(cfg: dict, source: str, validator, capture: Capture) -> dict:
    """Parse, validate, rewrite, compile and run ``source``; return the result dict (no stdout yet)."""
    entry = cfg.get("entry")
    try:
        tree = ast.parse(source, filename=PROGRAM_FILENAME, mode="exec")
        validator.validate(tree)
        tree = validator.rewrite(tree)
        code = compile(tree, PROGRAM_FILENAME, "exec")
    except SyntaxError as e:
        where = f"line {e.lineno}: " if e.lineno else ""
        return _failure("validation", f"{where}SyntaxError: {e.msg}", e.lineno)
    except validator.ProgramRejected as e:
        return _failure("validation", str(e), e.lineno)
    except (RecursionError, MemoryError):
        return _failure("validation", "the program is nested too deeply to be checked")
    except ValueError as e:  # e.g. null bytes (also checked by the host)
        return _failure("validation", f"ValueError: {e}")

    guards = Guards(cfg)
    env = build_globals(validator, guards, capture)
    source_lines = source.splitlines()
    sys.setrecursionlimit(int(cfg["recursion_limit"]))
    try:
        exec(code, env)
        if entry is None:
            value = env.get("answer")
        else:
            fn = env.get(entry)
            if fn is None:
                return _failure("no_entry", f"the program does not define {entry}(); define `def {entry}():`")
            if not callable(fn):
                return _failure("no_entry", f"{entry} is a {type(fn).__name__}, not a function")
            value = fn()
    except _Abort as e:
        text, line = _describe(e, source_lines)
        return _failure(e.error_type, text, line)
    except MemoryError as e:
        env.clear()
        line = _user_line(e)
        where = f"line {line}: " if line else ""
        return _failure(
            "memory", f"{where}MemoryError: the program needed more than {cfg['memory_mb']} MiB", line
        )
    except BaseException as e:  # the program's own error (incl. RecursionError, SystemExit)
        text, line = _describe(e, source_lines)
        return _failure("runtime", text, line)
    finally:
        sys.setrecursionlimit(1000)
    try:
        data = to_jsonable(value)
        size = len(json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, RecursionError) as e:
        return _failure("bad_value", f"{entry or 'answer'} returned a bad value: {e}")
    except ValueError as e:  # too many items / too deep / an int past the digit limit
        return _failure("output_limit", f"{entry or 'answer'} returned a value too large to send back: {e}")
    if size > int(cfg["max_output_bytes"]):
        return _failure(
            "output_limit",
            f"the returned value is {size} bytes as JSON; the limit is {cfg['max_output_bytes']}",
        )
    return {"ok": True, "value": data, "error_type": None, "message": None, "line": None}


def _emit(result: dict) -> None:
    text = json.dumps(result, ensure_ascii=False)
    # lone surrogates (e.g. chr(0xD800)) cannot travel as UTF-8: send U+FFFD instead
    text = _SURROGATES.sub("\ufffd", text)
    data = (text + "\n").encode("utf-8")
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


def main() -> None:
    cfg = json.loads(sys.argv[1])
    apply_limits(cfg)
    capture = Capture(int(cfg["max_output_bytes"]))
    try:
        validator = load_validator()
        raw = sys.stdin.buffer.read(int(cfg["max_source_bytes"]) + 1)
        if len(raw) > int(cfg["max_source_bytes"]):
            result = _failure("validation", f"the program is longer than {cfg['max_source_bytes']} bytes")
        elif b"\x00" in raw:
            result = _failure("validation", "the program contains a NUL byte")
        else:
            try:
                source = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                result = _failure("validation", f"the program is not valid UTF-8 (byte {e.start})")
            else:
                result = run_program(cfg, source, validator, capture)
    except MemoryError:
        result = _failure("memory", f"the sandbox ran out of memory ({cfg['memory_mb']} MiB)")
    except CpuLimitExceeded as e:
        result = _failure("timeout", str(e))
    except BaseException as e:  # a bug in the worker itself, not the program's fault
        result = _failure("crashed", f"sandbox worker error: {type(e).__name__}: {e}")
    result["stdout"] = capture.text()
    try:
        _emit(result)
    except MemoryError:
        os._exit(EXIT_MEMORY)
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except MemoryError:
        os._exit(EXIT_MEMORY)
    except BaseException:
        os._exit(EXIT_INTERNAL)
