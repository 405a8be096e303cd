"""The local log of every ``ask`` / ``chat`` exchange: one SQLite file, one row per question and answer.

Modelled on simonw/llm's ``llm logs`` (a ``logs.db`` next to the tool's other files): every exchange is
appended with its question, answer, agent, index, fallback, timing and the whole ``Trace`` as JSON, so the
log is both a history to read (``ragloop logs``) and training data (``ragloop logs --traces out.jsonl``
writes the Trace JSONL that ``ragloop train sft --traces`` reads).

The file is ``$RAGLOOP_HOME/logs.db`` (``~/.ragloop/logs.db``); ``--no-log`` on ``ask`` / ``chat`` skips it.
SQLite's own locking makes concurrent appends from several processes safe; each append is one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragloop.core.config import ragloop_home
from ragloop.core.errors import DataError
from ragloop.core.trace import Trace

LOG_FILE = "logs.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    command TEXT NOT NULL,
    agent TEXT NOT NULL,
    index_name TEXT,
    question TEXT NOT NULL,
    answer TEXT,
    fallback TEXT,
    seconds REAL,
    policy TEXT,
    trace_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS exchanges_created ON exchanges(created_at);
"""


def log_path(home: Path | None = None) -> Path:
    """Where the log lives: ``<home>/logs.db`` (home: ``$RAGLOOP_HOME`` or ``~/.ragloop``)."""
    return (home or ragloop_home()) / LOG_FILE


@dataclass(frozen=True)
class LogEntry:
    """One logged exchange (``trace`` is parsed on demand from ``trace_json``)."""

    id: int
    created_at: float
    command: str
    agent: str
    index: str | None
    question: str
    answer: str | None
    fallback: str | None
    seconds: float | None
    policy: str | None
    trace_json: str

    def trace(self) -> Trace:
        return Trace.from_json(self.trace_json)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created_at)),
                "command": self.command, "agent": self.agent, "index": self.index, "question": self.question,
                "answer": self.answer, "fallback": self.fallback, "seconds": self.seconds, "policy": self.policy,
                "trace_id": json.loads(self.trace_json).get("id")}


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise DataError(f"no log yet at {path}", hint='every `ragloop ask` / `chat` exchange is logged there')
    try:
        con = sqlite3.connect(str(path), timeout=10.0)
        con.executescript(_SCHEMA)
    except sqlite3.DatabaseError as e:
        raise DataError(f"the log {path} is not a readable SQLite file ({e})",
                        hint="move it away; a new log is started on the next `ragloop ask`") from None
    return con


def append_exchange(trace: Trace, *, command: str, index: str | None = None, path: Path | None = None) -> int:
    """Append one exchange; returns its row id."""
    p = path or log_path()
    with closing(_connect(p, create=True)) as con, con:
        cur = con.execute(
            "INSERT INTO exchanges (trace_id, created_at, command, agent, index_name, question, answer, fallback, "
            "seconds, policy, trace_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (trace.id, time.time(), command, trace.agent, index, trace.question, trace.answer, trace.fallback,
             trace.seconds, trace.policy, trace.to_json()),
        )
        return int(cur.lastrowid or 0)


def recent_exchanges(n: int | None = 10, *, path: Path | None = None) -> list[LogEntry]:
    """The last ``n`` exchanges (all with ``n=None``), oldest first."""
    p = path or log_path()
    with closing(_connect(p, create=False)) as con:
        sql = ("SELECT id, created_at, command, agent, index_name, question, answer, fallback, seconds, policy, "
               "trace_json FROM exchanges ORDER BY id DESC")
        rows = con.execute(sql + (" LIMIT ?" if n is not None else ""), (n,) if n is not None else ()).fetchall()
    return [LogEntry(*r) for r in reversed(rows)]


def iter_logged_traces(n: int | None = None, *, path: Path | None = None) -> Iterator[Trace]:
    """The Traces of the last ``n`` exchanges (all by default), oldest first."""
    for e in recent_exchanges(n, path=path):
        yield e.trace()
