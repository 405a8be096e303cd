"""Search and Lookup over the user's documents: the two retrieval actions of ReAct (Yao et al. 2023).

In the paper, ``Search[entity]`` returns the first paragraph of a Wikipedia page and ``Lookup[keyword]``
returns the next sentence containing the keyword in that page. Here ``Search[query]`` asks a retriever
for the best passages of the user's index and makes the top hit's document the *current document*;
``Lookup[keyword]`` walks the sentences of that document that contain the keyword
(``(Result 1 / 3) …``), as the paper's Wikipedia environment does.

Backends (``SearchBackend`` protocol):
- ``RetrieverBackend`` adapts ``ragloop.retrieval.Retriever`` (FAISS / BM25 / hybrid).
- ``KeywordBackend`` scores in-memory documents by word overlap (idf-weighted) — for tiny corpora,
  examples and logic tests; real runs use the retriever.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from ragloop.agents.tools import Tool, ToolResult
from ragloop.core.errors import UsageError


@dataclass
class SearchHit:
    """One retrieved passage, backend-independent."""

    chunk_id: str
    doc_id: str
    text: str
    score: float = 0.0
    title: str = ""


class SearchBackend(Protocol):
    def search(self, query: str, k: int) -> list[SearchHit]: ...

    def document(self, doc_id: str) -> str | None:
        """Full text of a document, or None when the backend only knows passages."""
        ...


def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = obj.get(n) if isinstance(obj, Mapping) else getattr(obj, n, None)
        if v not in (None, ""):
            return v
    return default


class RetrieverBackend:
    """Adapts a ``ragloop.retrieval`` retriever: ``search(query, k, mode) -> list[Hit]``."""

    def __init__(self, retriever: Any, *, mode: str | None = None) -> None:
        self.retriever = retriever
        self.mode = mode

    def search(self, query: str, k: int) -> list[SearchHit]:
        kwargs: dict[str, Any] = {"k": k}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        hits = self.retriever.search(query, **kwargs)
        out = []
        for h in hits:
            meta = _attr(h, "metadata", default={}) or {}
            doc_id = str(_attr(h, "doc_id", "source", default="") or _attr(meta, "doc_id", "source", default=""))
            out.append(
                SearchHit(
                    chunk_id=str(_attr(h, "chunk_id", "id", default=doc_id)),
                    doc_id=doc_id,
                    text=str(_attr(h, "text", "page_content", default="")),
                    score=float(_attr(h, "score", default=0.0)),
                    title=str(_attr(meta, "title", default="") or _attr(h, "title", default="")),
                )
            )
        return out

    def document(self, doc_id: str) -> str | None:
        for name in ("document_text", "get_document", "document"):
            fn = getattr(self.retriever, name, None)
            if callable(fn):
                doc = fn(doc_id)
                if doc is None:
                    return None
                return doc if isinstance(doc, str) else str(_attr(doc, "text", "page_content", default=""))
        return None


_WORD_RE = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(text)]


class KeywordBackend:
    """In-memory documents ranked by idf-weighted word overlap (tiny corpora, examples, tests).

    ``docs`` maps a doc id to its text, or to ``{"title": .., "text": ..}``.
    """

    def __init__(self, docs: Mapping[str, str | Mapping[str, str]]) -> None:
        if not docs:
            raise UsageError("KeywordBackend needs at least one document")
        self._docs: dict[str, tuple[str, str]] = {}
        for doc_id, d in docs.items():
            if isinstance(d, str):
                self._docs[str(doc_id)] = ("", d)
            else:
                self._docs[str(doc_id)] = (str(d.get("title", "")), str(d.get("text", "")))
        self._bags = {i: Counter(_words(t + " " + x)) for i, (t, x) in self._docs.items()}
        df: Counter[str] = Counter()
        for bag in self._bags.values():
            df.update(bag.keys())
        n = len(self._docs)
        self._idf = {w: math.log(1 + n / c) for w, c in df.items()}

    def search(self, query: str, k: int) -> list[SearchHit]:
        q = set(_words(query))
        scored = []
        for doc_id, bag in self._bags.items():
            s = sum(self._idf[w] * (1 + math.log(bag[w])) for w in q if w in bag)
            if s > 0:
                scored.append((s, doc_id))
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [
            SearchHit(chunk_id=doc_id, doc_id=doc_id, text=self._docs[doc_id][1], score=s,
                      title=self._docs[doc_id][0])
            for s, doc_id in scored[:k]
        ]

    def document(self, doc_id: str) -> str | None:
        d = self._docs.get(doc_id)
        return None if d is None else d[1]


_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")


def split_sentences(text: str) -> list[str]:
    """``split_sentences("A b. C d! e") -> ['A b.', 'C d! e']`` (a split needs a capital or digit next)."""
    return [s.strip() for s in _SENT_RE.split(text.strip()) if s.strip()]


@dataclass
class DocumentState:
    """Per-run state shared by Search and Lookup: the current document and the lookup cursor."""

    doc_id: str | None = None
    text: str = ""
    keyword: str | None = None
    results: list[str] = field(default_factory=list)
    cursor: int = 0

    def reset(self) -> None:
        self.doc_id, self.text, self.keyword, self.results, self.cursor = None, "", None, [], 0


class _QueryArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str


class _KeywordArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keyword: str


def format_hits(hits: Sequence[SearchHit], *, show: int, max_chars: int) -> str:
    """The observation for a search: the top ``show`` passages, each cut at ``max_chars`` (stated)."""
    parts = []
    for i, h in enumerate(hits[:show], 1):
        text = " ".join(h.text.split())
        if len(text) > max_chars:
            text = text[:max_chars].rstrip() + f" … [cut: {len(text) - max_chars} more characters]"
        head = f"({h.title}) " if h.title else ""
        parts.append(f"[{i}] {head}{text}" if show > 1 else f"{head}{text}")
    return " ".join(parts)


def search_tool(
    backend: SearchBackend,
    state: DocumentState,
    *,
    k: int = 3,
    show: int = 1,
    max_chars: int = 700,
) -> Tool:
    """``Search[query]``: the best passages of the index; the top hit's document becomes current."""
    if k < 1 or show < 1:
        raise UsageError(f"search needs k >= 1 and show >= 1, got k={k}, show={show}")

    def run(query: str) -> ToolResult:
        q = query.strip()
        if not q:
            return ToolResult(False, "Error: empty search query", error_type="invalid-arguments")
        hits = backend.search(q, max(k, show))
        if not hits:
            return ToolResult(False, f"Could not find [{q}].", error_type="no-results")
        top = hits[0]
        state.reset()
        state.doc_id = top.doc_id
        state.text = backend.document(top.doc_id) or top.text
        return ToolResult(
            True,
            format_hits(hits, show=show, max_chars=max_chars),
            value=[h.chunk_id for h in hits],
            retrieved_ids=[h.chunk_id for h in hits],
        )

    return Tool(
        "Search",
        "searches the user's documents for the query and returns the most relevant passage.",
        _QueryArgs,
        run,
        reset=state.reset,
    )


def lookup_tool(state: DocumentState) -> Tool:
    """``Lookup[keyword]``: the next sentence containing ``keyword`` in the current document."""

    def run(keyword: str) -> ToolResult:
        kw = keyword.strip()
        if state.doc_id is None:
            return ToolResult(False, "Error: nothing to look up in yet; use Search first.", error_type="no-document")
        if not kw:
            return ToolResult(False, "Error: empty lookup keyword", error_type="invalid-arguments")
        if kw.lower() != (state.keyword or "").lower():
            state.keyword = kw
            state.results = [s for s in split_sentences(state.text) if kw.lower() in s.lower()]
            state.cursor = 0
        if state.cursor >= len(state.results):
            return ToolResult(False, "No more results.", error_type="no-results")
        i = state.cursor
        state.cursor += 1
        return ToolResult(True, f"(Result {i + 1} / {len(state.results)}) {state.results[i]}",
                          retrieved_ids=[state.doc_id])

    return Tool("Lookup", "returns the next sentence containing the keyword in the current document.",
                _KeywordArgs, run)


def document_tools(backend: SearchBackend, *, k: int = 3, show: int = 1, max_chars: int = 700) -> list[Tool]:
    """Search and Lookup sharing one DocumentState (a fresh one per call)."""
    state = DocumentState()
    return [search_tool(backend, state, k=k, show=show, max_chars=max_chars), lookup_tool(state)]
