"""Searching an index: dense (FAISS), lexical (BM25) or hybrid (reciprocal rank fusion of both).

``Retriever.open(path)`` resolves the index pointer once and loads that generation into memory (verified),
so a retriever answers from one consistent snapshot while a writer re-indexes; ``refresh()`` moves to the
newest generation. The embedder is the one the index was built with (from its manifest) unless one is
passed in; a different embedder name or dimension is an error, never silently wrong results.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval import bm25 as bm25_mod
from ragloop.retrieval import faiss_index
from ragloop.retrieval.docstore import ChunkRecord, DocumentRecord
from ragloop.retrieval.embeddings import Embedder, load_embedder
from ragloop.retrieval.fusion import RRF_K, reciprocal_rank_fusion
from ragloop.retrieval.store import Snapshot, load_snapshot, read_pointer, resolve_index_path

log = logging.getLogger(__name__)

SearchMode = Literal["dense", "bm25", "hybrid"]
SEARCH_MODES = ("dense", "bm25", "hybrid")


class Hit(BaseModel):
    """One retrieved chunk. ``score``: cosine (dense), BM25 (bm25) or RRF (hybrid); higher is better."""

    rank: int
    score: float
    chunk_id: str
    doc_id: str
    source: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = {}


def _hit(rank: int, score: float, c: ChunkRecord) -> Hit:
    return Hit(rank=rank, score=score, chunk_id=c.chunk_id, doc_id=c.doc_id, source=str(c.metadata.get("source", c.doc_id)),
               text=c.text, title=str(c.metadata.get("title", "")), metadata=c.metadata)


class Retriever:
    """Read-only search over one generation of an index."""

    def __init__(self, snapshot: Snapshot, embedder: Embedder | None = None, *, candidates: int = 100) -> None:
        self._snap = snapshot
        self._embedder = embedder
        self.candidates = candidates  # per-method depth fused by hybrid search
        self._bm25_tokenizer = bm25_mod.BM25Tokenizer(bm25_mod.BM25Config.from_json(snapshot.manifest.bm25))
        if embedder is not None:
            self._check_embedder(embedder)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, embedder: Embedder | None = None) -> Retriever:
        """Open an index by path or bare name (``mydocs`` -> ``~/.ragloop/indexes/mydocs``)."""
        root = resolve_index_path(path) if isinstance(path, str) else Path(path)
        return cls(load_snapshot(root), embedder)

    # -- properties --------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._snap.root

    @property
    def generation(self) -> str:
        return self._snap.generation

    @property
    def embedder_name(self) -> str:
        return self._snap.manifest.embedder_name

    @property
    def dimension(self) -> int:
        return self._snap.manifest.dimension

    def __len__(self) -> int:
        return self._snap.n_chunks

    @property
    def num_documents(self) -> int:
        return self._snap.manifest.counts.documents

    @property
    def embedder(self) -> Embedder:
        """The query embedder, loaded from the manifest on first dense/hybrid search."""
        if self._embedder is None:
            emb = load_embedder(self._snap.manifest.embedder)
            self._check_embedder(emb)
            self._embedder = emb
        return self._embedder

    def _check_embedder(self, emb: Embedder) -> None:
        m = self._snap.manifest
        if emb.name != m.embedder_name or emb.dimension != m.dimension:
            raise IndexStoreError(
                f"index {self.path} was built with embedder {m.embedder_name!r} (dimension {m.dimension}); "
                f"the embedder given is {emb.name!r} (dimension {emb.dimension})",
                hint="query with the embedder the index was built with, or re-index with --rebuild",
            )

    # -- search ------------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, mode: SearchMode = "hybrid") -> list[Hit]:
        """The k best chunks for ``query``, best first (``rank`` 1-based)."""
        ranked = self._ranked_rows(query, k, mode, depth=max(self.candidates, k))
        return self._hits(ranked[:k])

    def search_documents(self, query: str, k: int = 5, mode: SearchMode = "hybrid") -> list[Hit]:
        """The k best documents, each represented by its best chunk (for document-level evaluation)."""
        depth = max(self.candidates, 4 * k)
        while True:
            ranked = self._ranked_rows(query, depth, mode, depth=depth)
            rows = self._snap.docstore.chunks_by_rows([r for r, _ in ranked])
            best: dict[str, tuple[int, float]] = {}
            for row, score in ranked:
                best.setdefault(rows[row].doc_id, (row, score))
            if len(best) >= k or len(ranked) < depth or depth >= len(self):
                break
            depth *= 4
        return self._hits(list(best.values())[:k])

    def search_by_vector(self, vector: Any, k: int = 5) -> list[Hit]:
        """Dense search with a query vector (D,) that is already embedded (and L2-normalised)."""
        import numpy as np

        v = np.asarray(vector, dtype=np.float32).reshape(-1)  # (D,)
        if v.shape[0] != self.dimension:
            raise UsageError(f"query vector has dimension {v.shape[0]}, the index {self.dimension}")
        return self._hits(faiss_index.search(self._snap.faiss, v, k))

    def _ranked_rows(self, query: str, k: int, mode: str, *, depth: int) -> list[tuple[int, float]]:
        if not isinstance(query, str) or not query.strip():
            raise UsageError("the search query is empty", hint="give some words to search for")
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}")
        if mode not in SEARCH_MODES:
            raise UsageError(f"unknown search mode {mode!r}", hint=f"use one of {', '.join(SEARCH_MODES)}")
        if mode == "dense":
            return self._dense(query, k)
        if mode == "bm25":
            return self._bm25(query, k)
        dense, lexical = self._dense(query, depth), self._bm25(query, depth)
        fused = reciprocal_rank_fusion([[r for r, _ in dense], [r for r, _ in lexical]], k=RRF_K)
        return [(int(r), s) for r, s in fused[:k]]  # type: ignore[call-overload]

    def _dense(self, query: str, k: int) -> list[tuple[int, float]]:
        q = self.embedder.embed_query(query)  # (D,)
        return faiss_index.search(self._snap.faiss, q, k)

    def _bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        if self._snap.bm25 is None:
            raise IndexStoreError(f"index {self.path} has no BM25 index", hint="re-index with --rebuild")
        return bm25_mod.search_bm25(self._snap.bm25, self._bm25_tokenizer, query, k)

    def _hits(self, ranked: list[tuple[int, float]]) -> list[Hit]:
        rows = self._snap.docstore.chunks_by_rows([r for r, _ in ranked])
        return [_hit(i, s, rows[r]) for i, (r, s) in enumerate(ranked, start=1)]

    # -- lookups -----------------------------------------------------------------------------------------
    def get(self, chunk_id: str) -> Hit | None:
        """A chunk by id (rank 0, score 0), or None."""
        c = self._snap.docstore.chunk(chunk_id)
        return _hit(0, 0.0, c) if c else None

    def document(self, doc_id: str) -> DocumentRecord | None:
        """A stored document (source, title, full text, metadata), or None."""
        return self._snap.docstore.document(doc_id)

    def document_text(self, doc_id: str) -> str | None:
        """The full text of a hit's document (what ReAct's Lookup searches), or None."""
        d = self._snap.docstore.document(doc_id)
        return d.text if d else None

    def chunks_of(self, doc_id: str) -> list[Hit]:
        return [_hit(0, 0.0, c) for c in self._snap.docstore.chunks_of(doc_id)]

    def documents(self) -> list[DocumentRecord]:
        return list(self._snap.docstore.documents())

    # -- lifecycle ---------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Move to the newest generation if the index changed; True when it did."""
        ptr = read_pointer(self.path)
        if ptr is None or ptr.generation in (self.generation, self._snap.fallback_from):  # unchanged (or still damaged)
            return False
        new = load_snapshot(self.path)
        old, self._snap = self._snap, new
        old.docstore.close()
        self._bm25_tokenizer = bm25_mod.BM25Tokenizer(bm25_mod.BM25Config.from_json(new.manifest.bm25))
        if self._embedder is not None:
            self._check_embedder(self._embedder)
        return True

    def close(self) -> None:
        self._snap.docstore.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
