"""Search modes, argument checks, lookups and snapshot refresh."""

from __future__ import annotations

import pytest
from retrieval_helpers import docs

from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval import Hit, Retriever, index_documents

CORPUS = {
    "sampling": "Nucleus sampling keeps the smallest set of tokens whose cumulative probability exceeds p.",
    "faiss": "FAISS performs similarity search over dense vectors using inner product.",
    "bm25": "BM25 ranks documents by term frequency and inverse document frequency.",
    "ppo": "Proximal policy optimisation clips the probability ratio.",
}


@pytest.fixture
def retriever(tmp_path, emb):
    index_documents(docs(CORPUS), tmp_path / "idx", embedder=emb)
    with Retriever.open(tmp_path / "idx", embedder=emb) as r:
        yield r


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_modes_find_the_right_document(retriever, mode):
    hits = retriever.search("inverse document frequency term", k=3, mode=mode)
    assert isinstance(hits[0], Hit) and hits[0].doc_id == "bm25"
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))


def test_hybrid_is_rrf_of_both(retriever):
    hits = retriever.search("dense vectors probability", k=4, mode="hybrid")
    dense = [h.chunk_id for h in retriever.search("dense vectors probability", k=100, mode="dense")]
    lexical = [h.chunk_id for h in retriever.search("dense vectors probability", k=100, mode="bm25")]
    for h in hits:
        expected = sum(1 / (60 + lst.index(h.chunk_id) + 1) for lst in (dense, lexical) if h.chunk_id in lst)
        assert h.score == pytest.approx(expected)


def test_bm25_only_stop_words_or_unknown_finds_nothing(retriever):
    assert retriever.search("the and of", k=3, mode="bm25") == []
    assert retriever.search("zzzqqq", k=3, mode="bm25") == []
    assert len(retriever.search("zzzqqq", k=3, mode="dense")) == 3


def test_k_larger_than_the_index(retriever):
    assert len(retriever.search("search", k=50, mode="dense")) == 4
    assert len(retriever.search_documents("search", k=50, mode="dense")) == 4


@pytest.mark.parametrize("query,k,mode,msg", [("", 3, "hybrid", "empty"), ("  ", 3, "dense", "empty"),
                                              ("x", 0, "bm25", "k must"), ("x", 3, "fuzzy", "unknown search mode")])
def test_bad_arguments(retriever, query, k, mode, msg):
    with pytest.raises(UsageError, match=msg):
        retriever.search(query, k=k, mode=mode)


def test_lookups(retriever):
    hit = retriever.search("nucleus", k=1)[0]
    assert retriever.get(hit.chunk_id).text == hit.text
    assert retriever.get("nope") is None
    assert retriever.document_text("sampling") == CORPUS["sampling"]
    assert retriever.document_text("nope") is None
    assert retriever.document("faiss").source == "faiss"
    assert len(retriever) == 4 and retriever.num_documents == 4
    assert retriever.embedder_name == "hashing-64" and retriever.dimension == 64
    v = retriever.embedder.embed_query(CORPUS["ppo"])
    assert retriever.search_by_vector(v, k=1)[0].doc_id == "ppo"
    with pytest.raises(UsageError, match="dimension"):
        retriever.search_by_vector(v[:10])


def test_snapshot_and_refresh(tmp_path, emb):
    root = tmp_path / "idx"
    index_documents(docs(CORPUS), root, embedder=emb)
    r = Retriever.open(root, embedder=emb)
    assert r.refresh() is False
    index_documents(docs({"only": "a single new document"}), root, embedder=emb)
    assert r.num_documents == 4  # the snapshot it opened
    assert r.refresh() is True and r.num_documents == 1 and r.generation == "gen-000002"
    r.close()


def test_embedder_from_the_manifest(tmp_path, emb):
    index_documents(docs(CORPUS), tmp_path / "idx", embedder=emb)
    with Retriever.open(tmp_path / "idx") as r:  # hashing embedder rebuilt from the manifest spec
        assert r.search("inner product vectors", k=1, mode="dense")[0].doc_id == "faiss"


def test_open_errors(tmp_path, ragloop_home):
    with pytest.raises(IndexStoreError, match="no index at"):
        Retriever.open(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexStoreError, match="holds no index"):
        Retriever.open(tmp_path / "empty")
    with pytest.raises(IndexStoreError, match=str(ragloop_home / "indexes" / "mydocs")):
        Retriever.open("mydocs")
