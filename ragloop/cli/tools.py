"""``ragloop sandbox | score``: run a program through the code sandbox, and score outputs with a metric.

Thin commands: parse, call one library function, print. ``sandbox`` exits 0 when the program ran, 1 when
it failed (any sandbox error type), 2 on usage errors. Program output is untrusted text: control
characters are escaped before they reach the terminal (the ``--json`` line is JSON-escaped anyway).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import typer

from ragloop.core.errors import RagloopError, UsageError

# C0/C1 controls (not \t \n), and the bidi embedding/override/isolate marks ("Trojan Source")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _safe(text: str) -> str:
    """``_safe("a\\x1b[2J") -> "a\\\\x1b[2J"``: no escape sequence from a program reaches the terminal, and no
    right-to-left override (``\\u202e``) reorders what is printed after it."""

    def shown(m: re.Match[str]) -> str:
        code = ord(m.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(shown, text)


class ProgramFailed(RagloopError):
    """The sandboxed program did not produce a value (its result line says why); exit code 1."""

    exit_code = 1


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _read_text(path: str, what: str, *, max_bytes: int | None = None) -> str:
    """The file (or stdin for ``-``) as UTF-8 text. With ``max_bytes``, a larger input raises ``_TooLarge``
    after reading at most ``max_bytes + 1`` bytes (never the whole file: a 300 MB "program" stays on disk)."""
    limit = -1 if max_bytes is None else max_bytes + 1
    if path == "-":
        data = sys.stdin.buffer.read(limit)
        name = "<stdin>"
    else:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{what} file not found: {_safe(path)}", hint="check the path")
        if not p.is_file():
            raise UsageError(f"{what} is not a regular file: {_safe(path)}")
        try:
            size = p.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise _TooLarge(size)
            with p.open("rb") as f:
                data = f.read(limit)
        except OSError as e:
            raise UsageError(f"cannot read {what} file {_safe(path)}: {e.strerror}") from e
        name = _safe(path)
    if max_bytes is not None and len(data) > max_bytes:
        raise _TooLarge(len(data))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsageError(
            f"{name} is not valid UTF-8 (line {line}, byte {e.start})", hint="convert the file to UTF-8"
        ) from e


def sandbox_cmd(
    program: str = typer.Argument(..., help="Python file to run ('-' reads stdin)."),
    json_out: bool = typer.Option(
        False, "--json", help='Print one JSON line: {"ok": true, "value": ...} or the error.'
    ),
    entry: str = typer.Option(
        "solution", "--entry", help="Function to call; its return value is the result."
    ),
    module: bool = typer.Option(
        False, "--module", help="Run the file as a module; the result is the variable `answer`."
    ),
    timeout: float = typer.Option(
        5.0, "--timeout", help="Wall-clock limit in seconds (also sets the CPU limit)."
    ),
    memory_mb: int = typer.Option(
        512, "--memory-mb", help="Address-space limit of the sandbox process, MiB."
    ),
) -> None:
    """Run a Python program in the PAL sandbox (separate process, rlimits, AST allow-list).

    Examples:
      ragloop sandbox prog.py --json
      echo 'def solution(): return 6 * 7' | ragloop sandbox - --timeout 2
    """
    from ragloop.agents.sandbox import Sandbox, SandboxLimits
    from ragloop.agents.sandbox.host import SandboxResult

    if not (0 < timeout <= 3600) or math.isnan(timeout):
        raise UsageError(f"--timeout must be in (0, 3600] seconds, got {timeout}")
    limits = SandboxLimits(wall_seconds=timeout, cpu_seconds=max(1, math.ceil(timeout)), memory_mb=memory_mb)
    try:
        source = _read_text(program, "program", max_bytes=limits.max_source_bytes)
    except _TooLarge as e:  # the sandbox's own size check, done before the file is read
        result = SandboxResult(ok=False, error_type="validation",
                               message=f"the program is {'at least ' if program == '-' else ''}{e.size} bytes; "
                                       f"the limit is {limits.max_source_bytes}")
    else:
        result = Sandbox(limits).run(source, entry=None if module else entry)
    if json_out:
        data = result.to_dict()
        if result.stdout:
            data["stdout"] = result.stdout
        # still one JSON line, but with control and bidi characters as JSON escapes (\u202e), not raw
        typer.echo(_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(data, ensure_ascii=False)))
    else:
        if result.stdout:
            typer.echo(_safe(result.stdout), nl=not result.stdout.endswith("\n"))
        if result.ok:
            typer.echo(_safe(json.dumps(result.value, ensure_ascii=False)))
        else:
            typer.echo(f"error ({result.error_type}): {_safe(result.message or '')}")
    if not result.ok:
        # an exception, not typer.Exit: main() runs click with standalone_mode=False, which drops Exit codes
        raise ProgramFailed(f"the program failed ({result.error_type})")


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final newline ends the last line; it does not start another
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _fmt(value: Any) -> str:
    if isinstance(value, dict):  # a P/R/F triple
        return " ".join(f"{k[0].upper()}={v:.4f}" for k, v in value.items())
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def score_cmd(
    metric: str = typer.Option(..., "--metric", help="em | f1 | numeric | rouge | bleu"),
    pred: str = typer.Option(..., "--pred", help="Predictions, one per line."),
    ref: list[str] = typer.Option(
        ..., "--ref", help="References, one per line, aligned with --pred (repeat for more)."
    ),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per example, then the aggregate."),
    stem: bool = typer.Option(False, "--stem", help="ROUGE: Porter-stem tokens (rouge-score's use_stemmer)."),
) -> None:
    """Score predictions against references: one line per example, then the aggregate.

    Examples:
      ragloop score --metric rouge --pred outputs.txt --ref references.txt
      ragloop score --metric bleu --pred out.txt --ref ref1.txt --ref ref2.txt --json
    """
    from ragloop.eval.metrics import SCORE_METRICS, score_texts

    if metric not in SCORE_METRICS:
        raise UsageError(f"unknown --metric {metric!r}", hint=f"use one of: {', '.join(SCORE_METRICS)}")
    preds = _lines(_read_text(pred, "--pred"))
    ref_sets = [_lines(_read_text(r, "--ref")) for r in ref]
    for path, lines in zip(ref, ref_sets, strict=True):
        if len(lines) != len(preds):
            raise UsageError(
                f"{pred} has {len(preds)} lines but {path} has {len(lines)}",
                hint="predictions and references must be aligned one example per line",
            )
    if not preds:
        raise UsageError(f"nothing to score: {pred} is empty")
    refs = [list(group) for group in zip(*ref_sets, strict=True)]
    try:
        report = score_texts(metric, preds, refs, use_stemmer=stem)
    except ValueError as e:
        raise UsageError(str(e)) from e
    for i, row in enumerate(report.per_example, start=1):
        if json_out:
            typer.echo(json.dumps({"i": i, **row}))
        else:
            typer.echo(
                f"{i}\t" + "\t".join(f"{k} {_fmt(v)}" if len(row) > 1 else _fmt(v) for k, v in row.items())
            )
    agg = report.aggregate
    if json_out:
        typer.echo(json.dumps({"metric": metric, **agg}))
        return
    if metric == "bleu":
        typer.echo(f"corpus BLEU = {agg['bleu']:.2f} (n={agg['n']}, {agg['signature']})")
    elif metric == "rouge":
        typer.echo(
            f"mean over n={agg['n']}: " + "  ".join(f"{t} {_fmt(v)}" for t, v in agg.items() if t != "n")
        )
    else:
        lo, hi = agg["ci95"]
        typer.echo(f"{metric} = {agg[metric]:.4f} (95% CI {lo:.4f}–{hi:.4f}, n={agg['n']})")


def register(app: typer.Typer) -> None:
    app.command("sandbox")(sandbox_cmd)
    app.command("score")(score_cmd)
