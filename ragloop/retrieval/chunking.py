"""Chunking documents into passages sized in the embedder's own tokens.

The splitting itself is langchain-text-splitters' ``RecursiveCharacterTextSplitter`` (paragraphs, then
lines, then words; code-aware separators for source files). Sizes are counted in the embedder's tokens so
that no chunk is ever truncated by the model window. Two details make that fast and exact:

- the splitter measures every piece separately (each word at the finest level), so calling the tokenizer
  per piece costs ~8 ms per abstract; ``TokenCounter`` tokenizes a document's distinct words in one batch
  and sums cached per-word counts. For WordPiece tokenizers (BERT, MiniLM) whose pre-tokenizer splits on
  whitespace this sum is exactly the token count;
- for any other tokenizer the sum can be off by a little, so every finished chunk is counted exactly once
  more and any chunk over the window is split again with exact counts (``_enforce_window``). For additive
  tokenizers only chunks within a few tokens of the window are re-counted.

Each chunk keeps its source, title, page and line span as metadata, and gets an id that is stable across
runs: a hash of (document id, document content hash, chunking settings, position).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ragloop.core.errors import UsageError
from ragloop.retrieval.loaders import SourceDocument

if TYPE_CHECKING:
    from langchain_text_splitters import RecursiveCharacterTextSplitter


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut into passages."""

    chunk_tokens: int = 200  # passage size in embedder tokens (MiniLM reads at most 254 + 2 special)
    chunk_overlap: int = 32  # tokens shared by consecutive passages, so a sentence cut in two is found whole

    def __post_init__(self) -> None:
        if self.chunk_tokens < 8:
            raise UsageError(f"chunk size must be at least 8 tokens, got {self.chunk_tokens}")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise UsageError(
                f"chunk overlap must be >= 0 and smaller than the chunk size ({self.chunk_tokens}), "
                f"got {self.chunk_overlap}"
            )

    def signature(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Chunk:
    """One passage: what gets embedded, searched and returned."""

    chunk_id: str
    doc_id: str
    ordinal: int  # position in its document, 0-based
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def chunk_id_for(doc_id: str, content_hash: str, signature: str, ordinal: int) -> str:
    """Stable id: the same document content, cut the same way, gets the same ids on every run."""
    h = hashlib.sha256(f"{doc_id}\0{content_hash}\0{signature}\0{ordinal}".encode()).hexdigest()
    return h[:20]


class TokenCounter:
    """Token length of a string as the sum of cached per-word counts (see the module docstring)."""

    def __init__(self, count_batch: Callable[[Sequence[str]], list[int]], max_cache: int = 100_000) -> None:
        self._count_batch = count_batch
        self._cache: dict[str, int] = {}
        self._max_cache = max_cache

    def prime(self, text: str) -> None:
        """Count every not-yet-seen word of ``text`` in one tokenizer call."""
        new = [w for w in set(text.split()) if w not in self._cache]
        if len(self._cache) + len(new) > self._max_cache:
            self._cache.clear()
        if new:
            self._cache.update(zip(new, self._count_batch(new), strict=True))

    def __call__(self, s: str) -> int:
        total = 0
        for w in s.split():
            n = self._cache.get(w)
            if n is None:
                n = self._count_batch([w])[0]
                self._cache[w] = n
            total += n
        return total


def _separators(language: str | None) -> list[str] | None:
    from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

    if not language:
        return None
    try:
        return RecursiveCharacterTextSplitter.get_separators_for_language(Language(language))
    except ValueError:
        return None


def _with_offsets(text: str, pieces: list[str]) -> list[tuple[str, int]]:
    """Attach each piece's start offset in ``text``; pieces are in order and may overlap.

    (LangChain's ``add_start_index`` subtracts the overlap, counted in tokens here, from a character
    offset, so it is wrong for token-sized chunks; this searches forward from the previous start instead.)
    ``_with_offsets("ab cd ef", ["ab cd", "cd ef"]) -> [("ab cd", 0), ("cd ef", 3)]``
    """
    out, prev = [], -1
    for p in pieces:
        i = text.find(p, prev + 1)
        if i < 0:
            i = max(text.find(p), 0)
        out.append((p, i))
        prev = i
    return out


class Chunker:
    """Cuts ``SourceDocument``s into ``Chunk``s for one embedder's tokenizer and window."""

    BLOCK_CHARS = 200_000  # text split at a time (see iter_split); ~200 chunks of 200 MiniLM tokens

    def __init__(
        self,
        config: ChunkingConfig,
        count_tokens: Callable[[Sequence[str]], list[int]],
        max_tokens: int,
        *,
        additive: bool = False,
    ) -> None:
        if config.chunk_tokens > max_tokens:
            raise UsageError(
                f"chunk size {config.chunk_tokens} tokens exceeds the embedder window of {max_tokens} tokens; "
                "chunks would be truncated",
                hint=f"use --chunk-tokens {max_tokens} or less",
            )
        self.config = config
        self.signature = config.signature()
        self.max_tokens = max_tokens
        self.additive = additive  # token count of a string == sum over its whitespace-separated words
        self._count_exact = count_tokens
        self._counter = TokenCounter(count_tokens)
        self._splitters: dict[str | None, RecursiveCharacterTextSplitter] = {}

    def _splitter(self, language: str | None) -> RecursiveCharacterTextSplitter:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        if language not in self._splitters:
            self._splitters[language] = RecursiveCharacterTextSplitter(
                separators=_separators(language),
                chunk_size=self.config.chunk_tokens,
                chunk_overlap=self.config.chunk_overlap,
                length_function=self._counter,
                is_separator_regex=language is not None and _separators(language) is not None,
            )
        return self._splitters[language]

    def split_text(self, text: str, language: str | None = None) -> list[tuple[str, int]]:
        """(chunk text, start offset in ``text``) pairs, every chunk within the embedder window."""
        return list(self.iter_split(text, language))

    def _split_block(self, text: str, language: str | None) -> list[tuple[str, int]]:
        self._counter.prime(text)
        return self._enforce_window(_with_offsets(text, self._splitter(language).split_text(text)))

    def iter_split(self, text: str, language: str | None = None) -> Iterator[tuple[str, int]]:
        """``split_text`` as a stream: the text is cut into blocks of about ``BLOCK_CHARS`` (at a line break or
        space when there is one), each block is split on its own, and the last chunk of a block is redone as
        the start of the next one, so chunks and overlaps run on across blocks. Working memory is bounded
        by the block, not the text: a 50 MB single-line file no longer builds millions of word strings at once
        (the splitter measures every word). A text shorter than a block is split exactly as before."""
        start, n = 0, len(text)
        while start < n:
            end = n if n - start <= self.BLOCK_CHARS else self._block_end(text, start)
            pieces = self._split_block(text[start:end], language)
            if end >= n or len(pieces) < 2:
                yield from ((p, start + off) for p, off in pieces)
                start = end
                continue
            yield from ((p, start + off) for p, off in pieces[:-1])
            start += max(pieces[-1][1], 1)  # the last chunk is redone with the text that follows it

    def _block_end(self, text: str, start: int) -> int:
        hard = start + self.BLOCK_CHARS
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, start + self.BLOCK_CHARS // 2, hard)
            if cut > start:
                return cut + len(sep)
        return hard

    def _enforce_window(self, pieces: list[tuple[str, int]]) -> list[tuple[str, int]]:
        if self.additive:
            # Counts are exact up to odd control characters; re-count only what comes close to the window.
            near = [i for i, (p, _) in enumerate(pieces) if self._counter(p) > self.max_tokens - 8]
            if not near:
                return pieces
        counts = self._count_exact([p for p, _ in pieces])
        if all(n <= self.max_tokens for n in counts):
            return pieces
        out: list[tuple[str, int]] = []
        for (piece, start), n in zip(pieces, counts, strict=True):
            if n <= self.max_tokens:
                out.append((piece, start))
                continue
            from langchain_text_splitters import RecursiveCharacterTextSplitter

            size = max(8, int(self.max_tokens * 0.9))
            while True:  # exact counts now; shrink until every sub-piece fits
                sub = RecursiveCharacterTextSplitter(
                    chunk_size=size, chunk_overlap=min(self.config.chunk_overlap, size // 4),
                    length_function=lambda s: self._count_exact([s])[0],
                ).split_text(piece)
                parts = [(p, start + off) for p, off in _with_offsets(piece, sub)]
                if all(c <= self.max_tokens for c in self._count_exact([p for p, _ in parts])) or size <= 8:
                    break
                size = max(8, int(size * 0.8))
            out.extend(parts)
        return out

    def chunk(self, doc: SourceDocument) -> list[Chunk]:
        """All chunks of a document, in order, with source/title/page/line metadata."""
        return list(self.iter_chunks(doc))

    def iter_chunks(self, doc: SourceDocument) -> Iterator[Chunk]:
        """The chunks of a document as a stream (see ``iter_split``), in order."""
        ordinal = 0
        language = doc.metadata.get("language")
        for seg in doc.segments:
            first_line = seg.metadata.get("line")
            newlines = [i for i, c in enumerate(seg.text) if c == "\n"] if first_line is not None else []
            for text, start in self.iter_split(seg.text, language):
                meta: dict[str, Any] = {"source": doc.source, "title": doc.title}
                meta.update({k: v for k, v in seg.metadata.items() if k != "line"})
                if first_line is not None:
                    line_start = first_line + bisect.bisect_right(newlines, start - 1)
                    meta["line_start"] = line_start
                    meta["line_end"] = line_start + text.count("\n")
                yield Chunk(chunk_id_for(doc.doc_id, doc.content_hash, self.signature, ordinal), doc.doc_id,
                            ordinal, text, meta)
                ordinal += 1
