"""LangChain adapters: ragloop's embedder as ``Embeddings``, its retriever as a ``BaseRetriever``, and its
crash-safe index as a ``VectorStore`` (add with ids, get by ids, delete, similarity search with scores).

They follow langchain-core 1.x; anything that takes these interfaces (LCEL chains, agents, a server-backed
vector store swapped in for scale) works with ragloop's index and vice versa.

In ``RagloopVectorStore`` each added text is one ragloop document whose id is the LangChain id; a long text
is chunked, and a search returns each matching document once — exactly as it was stored (id, full text,
metadata) — scored by its best chunk's cosine similarity. ``RagloopRetriever`` returns chunks (with their
provenance in the metadata) and takes a per-call ``k`` (``invoke(query, k=1)``).
Every add or delete is one new durable generation of the index.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import ConfigDict

from ragloop.core.errors import UsageError
from ragloop.retrieval.embeddings import Embedder, l2_normalise, load_embedder
from ragloop.retrieval.indexer import IndexConfig, delete_documents, index_documents
from ragloop.retrieval.loaders import SourceDocument
from ragloop.retrieval.retriever import Hit, Retriever
from ragloop.retrieval.store import read_pointer, resolve_index_path


class RagloopEmbeddings(Embeddings):
    """A ragloop ``Embedder`` (default: the embedded all-MiniLM-L6-v2) as LangChain ``Embeddings``."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self.embedder = embedder if embedder is not None else load_embedder(None)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed_documents(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed_query(text).tolist()


class LangChainEmbedder:
    """Any LangChain ``Embeddings`` as a ragloop ``Embedder``.

    LangChain does not expose a tokenizer or a window, so chunks are sized in whitespace-separated words and
    the model may truncate long ones: prefer a ragloop embedder when one exists.
    """

    def __init__(self, embeddings: Embeddings, *, name: str | None = None, max_tokens: int = 200) -> None:
        self.embeddings = embeddings
        self.name = name or f"langchain:{type(embeddings).__name__}"
        self.dimension = len(embeddings.embed_query("dimension probe"))
        self.max_tokens = max_tokens
        self.token_counts_additive = True

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        return l2_normalise(np.asarray(self.embeddings.embed_documents(list(texts)), dtype=np.float32))

    def embed_query(self, text: str) -> np.ndarray:
        return l2_normalise(np.asarray([self.embeddings.embed_query(text)], dtype=np.float32))[0]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def spec(self) -> dict[str, Any]:
        return {"kind": "langchain", "name": self.name, "dimension": self.dimension}


def as_embedder(embedding: Embedder | Embeddings | None) -> Embedder | None:
    """Unwrap ``RagloopEmbeddings``; wrap other LangChain ``Embeddings``; pass ragloop embedders through."""
    if embedding is None:
        return None
    if isinstance(embedding, RagloopEmbeddings):
        return embedding.embedder
    if isinstance(embedding, Embeddings):
        return LangChainEmbedder(embedding)
    return embedding


def hit_to_document(hit: Hit) -> Document:
    """A ragloop ``Hit`` as a LangChain ``Document`` (id = chunk id; score and provenance in metadata)."""
    meta = dict(hit.metadata)
    meta.update(chunk_id=hit.chunk_id, doc_id=hit.doc_id, source=hit.source, score=hit.score, rank=hit.rank)
    return Document(id=hit.chunk_id, page_content=hit.text, metadata=meta)


class RagloopRetriever(BaseRetriever):
    """A ragloop ``Retriever`` as a LangChain ``BaseRetriever`` (``invoke(query) -> list[Document]``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Retriever
    k: int = 5
    mode: str = "hybrid"

    @classmethod
    def from_index(cls, path: str | Path, *, embedder: Embedder | None = None, **kwargs: Any) -> RagloopRetriever:
        return cls(retriever=Retriever.open(path, embedder=embedder), **kwargs)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None,
        mode: str | None = None,
    ) -> list[Document]:
        """The ``k`` best chunks (per call ``invoke(query, k=1)`` overrides the field), as Documents."""
        k = self.k if k is None else int(k)
        if k < 1:
            raise UsageError(f"k must be a positive integer, got {k}")
        return [hit_to_document(h) for h in self.retriever.search(query, k=k, mode=mode or self.mode)]  # type: ignore[arg-type]


class RagloopVectorStore(VectorStore):
    """A ragloop index as a LangChain ``VectorStore`` (persistent, crash-safe, no pickle)."""

    def __init__(
        self,
        index_path: str | Path,
        embedding: Embedder | Embeddings | None = None,
        *,
        config: IndexConfig | None = None,
    ) -> None:
        self.root = resolve_index_path(index_path) if isinstance(index_path, str) else Path(index_path)
        self._embedder = as_embedder(embedding)
        self._config = config or IndexConfig()
        self._retriever: Retriever | None = None

    # -- VectorStore contract ------------------------------------------------------------------------------
    @property
    def embeddings(self) -> Embeddings | None:
        emb = self._embedder
        if isinstance(emb, LangChainEmbedder):
            return emb.embeddings
        return RagloopEmbeddings(emb) if emb is not None else None

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"{len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        ids = [str(i) if i is not None else str(uuid.uuid4()) for i in (ids or [None] * len(texts))]
        if not texts:
            return []
        docs = [SourceDocument.from_text(i, t, metadata=(metadatas[n] if metadatas else None))
                for n, (i, t) in enumerate(zip(ids, texts, strict=True))]
        empty = [d.doc_id for d in docs if not d.text.strip()]
        if empty:
            raise UsageError(f"cannot add empty texts (ids {empty[:3]})")
        index_documents(docs, self.root, embedder=self._embedder, config=self._config, replace=False)
        self._retriever = None
        return ids

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        if not ids:
            raise ValueError("delete() needs the ids to delete")
        if read_pointer(self.root) is None:
            return False
        delete_documents(self.root, ids)
        self._retriever = None
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        r = self._open()
        if r is None:
            return []
        out = []
        for i in ids:
            d = r.document(i)
            if d is not None:
                out.append(Document(id=d.doc_id, page_content=d.text, metadata=dict(d.metadata)))
        return out

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        r = self._open()
        if r is None:
            return []
        return [(self._doc_for_hit(r, h), h.score) for h in r.search_documents(query, k=k, mode="dense")]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k, **kwargs)]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        r = self._open()
        if r is None:
            return []
        vec = np.asarray(embedding, np.float32)
        depth = k
        while True:  # chunks → documents: look deeper until k distinct documents (or the index) are covered
            hits = r.search_by_vector(vec, k=depth)
            seen: dict[str, Hit] = {}
            for h in hits:
                seen.setdefault(h.doc_id, h)
            if len(seen) >= k or len(hits) < depth:
                return [self._doc_for_hit(r, h) for h in list(seen.values())[:k]]
            depth *= 4

    def _select_relevance_score_fn(self) -> Any:
        return lambda score: max(0.0, min(1.0, float(score)))  # cosine similarity of normalised vectors

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        index_path: str | Path | None = None,
        **kwargs: Any,
    ) -> RagloopVectorStore:
        if index_path is None:
            raise UsageError("RagloopVectorStore.from_texts needs index_path=... (where the index lives)")
        store = cls(index_path, embedding, config=kwargs.get("config"))
        store.add_texts(texts, metadatas, ids=ids)
        return store

    # -- helpers -------------------------------------------------------------------------------------------
    def _open(self) -> Retriever | None:
        if self._retriever is None:
            if read_pointer(self.root) is None:
                return None
            self._retriever = Retriever.open(self.root, embedder=self._embedder)
        else:
            self._retriever.refresh()
        return self._retriever

    @staticmethod
    def _doc_for_hit(r: Retriever, h: Hit) -> Document:
        """The document as it was stored (id, full text, metadata): what a VectorStore returns."""
        d = r.document(h.doc_id)
        if d is None:  # removed between the search and this read
            return Document(id=h.doc_id, page_content=h.text, metadata={})
        meta = d.metadata if isinstance(d.metadata, dict) else json.loads(d.metadata)
        return Document(id=d.doc_id, page_content=d.text, metadata=dict(meta))
