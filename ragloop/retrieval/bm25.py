"""Lexical search: Okapi BM25 (Robertson & Zaragoza 2009) through bm25s (Lù 2024), with Snowball stemming.

bm25s precomputes every (term, document) score into a sparse matrix, so a query is a sum of a few sparse
rows. Its files are numpy arrays saved with ``allow_pickle=False`` plus JSON; the store hashes and verifies
them like every other file of a generation.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragloop.core.errors import IndexStoreError


@dataclass(frozen=True)
class BM25Config:
    """Tokenisation and scoring settings, stored in the manifest so queries tokenise like the corpus."""

    stemmer: str | None = "english"  # Snowball language (PyStemmer), or None
    stopwords: str | None = "en"
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BM25Config:
        return cls(**{k: d[k] for k in ("stemmer", "stopwords", "k1", "b", "method") if k in d})


class BM25Tokenizer:
    """Lower-cased word tokens, English stop words removed, Snowball-stemmed.

    ``BM25Tokenizer(BM25Config())(["The runners are running"]) -> [["runner", "run"]]``
    """

    def __init__(self, config: BM25Config) -> None:
        self.config = config
        self._stemmer = None
        if config.stemmer:
            import Stemmer  # PyStemmer

            self._stemmer = Stemmer.Stemmer(config.stemmer)

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        if not texts:
            return []
        return bm25s.tokenize(list(texts), stopwords=self.config.stopwords, stemmer=self._stemmer,
                              return_ids=False, show_progress=False)


def build_bm25(texts: Sequence[str], config: BM25Config) -> Any:
    """A bm25s model over ``texts``; row i is document i."""
    import bm25s

    model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
    model.index(BM25Tokenizer(config)(texts), show_progress=False)
    return model


def bm25_files(model: Any) -> dict[str, bytes]:
    """The files bm25s writes for ``model``, as name -> bytes (the store writes them durably itself)."""
    with tempfile.TemporaryDirectory(prefix="ragloop-bm25-") as tmp:
        model.save(tmp, show_progress=False)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def load_bm25(directory: Path) -> Any:
    """Load a verified bm25s directory (no pickle: ``allow_pickle=False``)."""
    import bm25s

    try:
        return bm25s.BM25.load(str(directory), mmap=False, allow_pickle=False, load_corpus=False,
                               show_progress=False)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise IndexStoreError(f"cannot read the BM25 index in {directory}: {e}") from None


def bm25_num_docs(model: Any) -> int:
    return int(model.scores["num_docs"])


def search_bm25(model: Any, tokenizer: BM25Tokenizer, query: str, k: int) -> list[tuple[int, float]]:
    """Top-k (row, BM25 score) with a positive score, best first. A query of only stop words finds nothing."""
    tokens = [t for t in tokenizer([query])[0] if t in model.vocab_dict]
    if not tokens or k <= 0:
        return []
    scores = np.asarray(model.get_scores(tokens), dtype=np.float32)  # (N,)
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.lexsort((top, -scores[top]))]  # by score desc, then row asc (deterministic ties)
    return [(int(i), float(scores[i])) for i in top if scores[i] > 0]
