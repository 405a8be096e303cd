"""The docstore: documents and chunks of one index generation, in SQLite (no pickle).

A generation's docstore is built in memory and written as one file (``sqlite3.Connection.serialize``), so
the store can hash it and write it through its crash-safe path; readers deserialize it into an in-memory
database, which keeps their snapshot intact even after the generation directory is garbage-collected.

Row ``r`` of table ``chunks`` is vector ``r`` of the FAISS index and document ``r`` of the BM25 index.
Each chunk also keeps its BM25 tokens (space-joined stems), so an incremental update re-tokenizes only the
chunks that changed. Metadata may travel as its JSON text (``str``) to skip a parse/serialise round trip.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragloop.core.errors import IndexStoreError

SCHEMA_VERSION = "2"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    doc_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    title TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    n_chunks INTEGER NOT NULL
);
CREATE TABLE chunks (
    row INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    bm25_tokens TEXT NOT NULL
);
CREATE INDEX chunks_doc ON chunks(doc_id, ordinal);
"""


@dataclass
class DocumentRecord:
    """A stored document (its full text is kept for ReAct's Lookup)."""

    doc_id: str
    source: str
    title: str
    content_hash: str
    text: str
    metadata: dict[str, Any] | str = field(default_factory=dict)  # a str is already JSON
    n_chunks: int = 0


@dataclass
class ChunkRecord:
    """A stored chunk; ``row`` is its position in the vector and BM25 indexes."""

    row: int
    chunk_id: str
    doc_id: str
    ordinal: int
    text: str
    metadata: dict[str, Any] | str = field(default_factory=dict)  # a str is already JSON
    bm25_tokens: str = ""  # space-joined BM25 tokens of ``text``


def _json(m: dict[str, Any] | str) -> str:
    return m if isinstance(m, str) else json.dumps(m, ensure_ascii=False)


def build_docstore(documents: Sequence[DocumentRecord], chunks: Sequence[ChunkRecord]) -> bytes:
    """The SQLite file holding ``documents`` and ``chunks`` (rows must be 0..N-1 in order)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        conn.executemany(
            "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(d.doc_id, d.source, d.title, d.content_hash, d.text, _json(d.metadata), d.n_chunks) for d in documents],
        )
        conn.executemany(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(c.row, c.chunk_id, c.doc_id, c.ordinal, c.text, _json(c.metadata), c.bm25_tokens) for c in chunks],
        )
        conn.commit()
        return bytes(conn.serialize())
    finally:
        conn.close()


class DocStore:
    """Read access to a deserialized docstore (in memory; safe to share between threads for reading)."""

    def __init__(self, data: bytes, *, what: str) -> None:
        self.what = what
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            self._conn.deserialize(data)
            version = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if not version or version[0] != SCHEMA_VERSION:
                raise IndexStoreError(f"docstore {what} has schema version {version and version[0]!r}, "
                                      f"expected {SCHEMA_VERSION}")
            status = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            if status != "ok":
                raise IndexStoreError(f"docstore {what} is damaged: {status}")
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise IndexStoreError(f"docstore {what} is not a readable SQLite database: {e}") from None

    def close(self) -> None:
        self._conn.close()

    # -- counts and consistency ----------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(documents, chunks)."""
        d = self._conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        c = self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        return int(d), int(c)

    def check_consistency(self) -> list[str]:
        """Problems with the row numbering and document/chunk links (empty when consistent)."""
        problems = []
        n, lo, hi = self._conn.execute("SELECT COUNT(*), MIN(row), MAX(row) FROM chunks").fetchone()
        if n and (lo != 0 or hi != n - 1):
            problems.append(f"chunk rows are not 0..{n - 1} (min {lo}, max {hi})")
        orphans = self._conn.execute(
            "SELECT COUNT(*) FROM chunks WHERE doc_id NOT IN (SELECT doc_id FROM documents)").fetchone()[0]
        if orphans:
            problems.append(f"{orphans} chunks belong to no document")
        bad = self._conn.execute(
            "SELECT COUNT(*) FROM documents d WHERE n_chunks != "
            "(SELECT COUNT(*) FROM chunks c WHERE c.doc_id = d.doc_id)").fetchone()[0]
        if bad:
            problems.append(f"{bad} documents have a wrong chunk count")
        return problems

    # -- reads ----------------------------------------------------------------------------------------------
    @staticmethod
    def _chunk(row: tuple[Any, ...], parse: bool = True) -> ChunkRecord:
        return ChunkRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]) if parse else row[5], row[6])

    def chunks_by_rows(self, rows: Sequence[int]) -> dict[int, ChunkRecord]:
        out: dict[int, ChunkRecord] = {}
        rows = list(rows)
        for start in range(0, len(rows), 500):
            part = rows[start : start + 500]
            q = f"SELECT * FROM chunks WHERE row IN ({','.join('?' * len(part))})"
            out.update((r[0], self._chunk(r)) for r in self._conn.execute(q, part))
        return out

    def chunk(self, chunk_id: str) -> ChunkRecord | None:
        r = self._conn.execute("SELECT * FROM chunks WHERE chunk_id = ?", (chunk_id,)).fetchone()
        return self._chunk(r) if r else None

    def chunks_of(self, doc_id: str) -> list[ChunkRecord]:
        q = "SELECT * FROM chunks WHERE doc_id = ? ORDER BY ordinal"
        return [self._chunk(r) for r in self._conn.execute(q, (doc_id,))]

    def all_chunks(self, *, parse_metadata: bool = True) -> Iterator[ChunkRecord]:
        for r in self._conn.execute("SELECT * FROM chunks ORDER BY row"):
            yield self._chunk(r, parse_metadata)

    @staticmethod
    def _doc(r: tuple[Any, ...], parse: bool = True) -> DocumentRecord:
        return DocumentRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if parse else r[5], r[6])

    def document(self, doc_id: str) -> DocumentRecord | None:
        r = self._conn.execute("SELECT * FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        return self._doc(r) if r else None

    def documents(self, *, parse_metadata: bool = True) -> Iterator[DocumentRecord]:
        for r in self._conn.execute("SELECT * FROM documents ORDER BY doc_id"):
            yield self._doc(r, parse_metadata)

    def document_hashes(self) -> dict[str, str]:
        """doc_id -> content hash (what incremental indexing compares)."""
        return dict(self._conn.execute("SELECT doc_id, content_hash FROM documents"))
