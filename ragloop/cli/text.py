"""Text arguments from the command line: one check that they are real text.

On Linux, Python decodes ``argv`` with ``surrogateescape``: bytes that are not UTF-8 (``$'\\xff\\xfe hi'``)
arrive as lone surrogates (``'\\udcff\\udcfe hi'``), which tokenizers and JSON reject deep inside with a
TypeError. File-name arguments may legitimately hold such bytes (the OS takes them back), so only
arguments that are *text* — prompts, questions, queries — are checked, up front, with a message that
names the argument and the fix.
"""

from __future__ import annotations

import sys

from ragloop.core.errors import UsageError


def require_utf8(text: str, what: str) -> str:
    """``text`` unchanged, or a UsageError naming ``what`` and the first byte that is not UTF-8.

    ``require_utf8("hi", "the prompt") -> 'hi'``; ``require_utf8("\\udcff hi", "the prompt")`` raises
    ``UsageError("the prompt is not valid UTF-8 text (byte 0xff at position 1)")``.
    """
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":  # a byte that surrogateescape could not decode
            raise UsageError(f"{what} is not valid UTF-8 text (byte 0x{ord(ch) - 0xDC00:02x} at position {i + 1})",
                             hint="pass UTF-8 text (check the terminal's locale and encoding)")
        if "\ud800" <= ch <= "\udfff":
            raise UsageError(f"{what} contains a lone surrogate (position {i + 1})", hint="pass UTF-8 text")
    return text


def read_stdin_text(what: str) -> str:
    """All of stdin as UTF-8 text (a BOM is dropped), or a UsageError naming the first bad byte."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} on stdin is not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                         hint="convert it to UTF-8, e.g. iconv -t UTF-8") from None


def require_file_target(path: str | None, option: str) -> str | None:
    """``option``'s value names a file to write (JSONL): refuse a directory, or a parent that is a file,
    before any model runs (the write would fail only after the work was done)."""
    if path is None:
        return None
    from pathlib import Path

    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{option} {path} is a directory", hint=f"give a file name, e.g. {p / 'traces.jsonl'}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory", hint="give a path in a directory")
    return path
