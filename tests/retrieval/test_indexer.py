"""Incremental indexing from files and from memory: what is re-embedded, replaced, removed, kept."""

from __future__ import annotations

import os

import pytest
from retrieval_helpers import TOPICS, CountingEmbedder, docs, write_corpus

from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval import (
    EXIT_PARTIAL,
    ChunkingConfig,
    FaissConfig,
    IndexConfig,
    Retriever,
    build_index,
    delete_documents,
    index_documents,
)
from ragloop.retrieval.store import generation_dirs


def _ids(root, emb):
    with Retriever.open(root, embedder=emb) as r:
        return {d.doc_id: [c.chunk_id for c in r.chunks_of(d.doc_id)] for d in r.documents()}


def test_incremental_file_indexing(tmp_path):
    emb = CountingEmbedder()
    corpus = write_corpus(tmp_path / "docs")
    idx = tmp_path / "idx"
    s1 = build_index([corpus], idx, embedder=emb)
    assert (s1.added, s1.updated, s1.removed, s1.documents, s1.exit_code) == (4, 0, 0, 4, 0)
    assert len(emb.embedded) == s1.chunks_embedded == s1.chunks
    first = _ids(idx, emb)

    emb.embedded.clear()
    s2 = build_index([corpus], idx, embedder=emb)  # nothing changed: no embedding, no new generation
    assert (s2.changed, s2.unchanged, s2.generation, emb.embedded) == (False, 4, "gen-000001", [])

    (corpus / "faiss.txt").write_text("FAISS now also supports product quantisation for compression.\n")
    (corpus / "ppo.md").unlink()
    (corpus / "new.md").write_text("# New\n\nReciprocal rank fusion merges rankings.\n")
    s3 = build_index([corpus], idx, embedder=emb)
    assert (s3.added, s3.updated, s3.unchanged, s3.removed, s3.generation) == (1, 1, 2, 1, "gen-000002")
    assert all("quantisation" in t or "Reciprocal" in t for t in emb.embedded)  # only changed files embedded
    third = _ids(idx, emb)
    for unchanged in ("sampling.md", "bm25.rst"):
        key = str(corpus / unchanged)
        assert third[key] == first[key]  # stable chunk ids for unchanged files
    assert third[str(corpus / "faiss.txt")] != first[str(corpus / "faiss.txt")]
    assert str(corpus / "ppo.md") not in third
    with Retriever.open(idx, embedder=emb) as r:
        assert r.search("product quantisation compression", k=1, mode="bm25")[0].source.endswith("faiss.txt")
        assert not r.search("proximal policy clips ratio", k=5, mode="bm25")


def test_scope_other_paths_are_kept(tmp_path, emb):
    a = write_corpus(tmp_path / "a", {"x.txt": "apples in folder a"})
    b = write_corpus(tmp_path / "b", {"y.txt": "bananas in folder b"})
    idx = tmp_path / "idx"
    build_index([a, b], idx, embedder=emb)
    (a / "x.txt").write_text("apples changed")
    s = build_index([a], idx, embedder=emb)  # b is out of scope: kept, not removed
    assert (s.updated, s.removed, s.documents) == (1, 0, 2)
    assert set(_ids(idx, emb)) == {str(a / "x.txt"), str(b / "y.txt")}


def test_bad_files_are_counted_and_partial_exit(tmp_path, emb):
    corpus = write_corpus(tmp_path / "docs")
    (corpus / "bad.txt").write_bytes(b"caf\xe9")
    (corpus / "bin.txt").write_bytes(b"\x00\x01")
    os.mkfifo(corpus / "fifo.md")
    s = build_index([corpus], tmp_path / "idx", embedder=emb)
    assert s.documents == 4 and s.exit_code == EXIT_PARTIAL
    assert [(e.reason, os.path.basename(e.path)) for e in s.errors] == [("bad encoding", "bad.txt")]
    assert s.skipped == {"binary": [str(corpus / "bin.txt")], "not a regular file": [str(corpus / "fifo.md")]}


def test_a_file_that_turns_bad_keeps_or_drops_its_old_version(tmp_path, emb):
    corpus = write_corpus(tmp_path / "docs")
    idx = tmp_path / "idx"
    build_index([corpus], idx, embedder=emb)
    (corpus / "faiss.txt").write_bytes(b"caf\xe9")  # an error (maybe transient): keep the indexed version
    (corpus / "bm25.rst").write_bytes(b"")  # now empty (skipped by policy): remove it
    s = build_index([corpus], idx, embedder=emb)
    assert s.removed == 1 and s.exit_code == EXIT_PARTIAL
    ids = _ids(idx, emb)
    assert str(corpus / "faiss.txt") in ids and str(corpus / "bm25.rst") not in ids


def test_nothing_to_index_never_replaces_an_index(tmp_path, emb):
    corpus = write_corpus(tmp_path / "docs")
    idx = tmp_path / "idx"
    build_index([corpus], idx, embedder=emb)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="nothing to index"):
        build_index([empty], idx, embedder=emb)
    (empty / "x.bin").write_bytes(b"\x00")
    with pytest.raises(UsageError, match=r"1 unsupported type"):
        build_index([empty], idx, embedder=emb)
    with pytest.raises(UsageError, match="path not found"):
        build_index([tmp_path / "missing"], idx, embedder=emb)
    with pytest.raises(UsageError, match="no paths"):
        build_index([], idx, embedder=emb)
    with pytest.raises(UsageError, match="nothing to index"):
        build_index([empty], tmp_path / "fresh", embedder=emb)
    assert not (tmp_path / "fresh" / "CURRENT").exists()
    assert len(_ids(idx, emb)) == 4 and len(generation_dirs(idx)) == 1


def test_settings_are_kept_or_need_rebuild(tmp_path):
    emb = CountingEmbedder()
    idx = tmp_path / "idx"
    index_documents(docs(dict(TOPICS)), idx, embedder=emb)
    with pytest.raises(UsageError, match="--rebuild"):
        index_documents(docs(dict(TOPICS)), idx, embedder=emb, config=IndexConfig(chunking=ChunkingConfig(50, 5)))
    emb.embedded.clear()
    s = index_documents(docs(dict(TOPICS)), idx, embedder=emb,
                        config=IndexConfig(chunking=ChunkingConfig(50, 5), rebuild=True))
    assert s.changed and len(emb.embedded) == s.chunks  # everything re-embedded
    emb.embedded.clear()
    s = index_documents(docs(dict(TOPICS)), idx, embedder=emb, config=IndexConfig(faiss=FaissConfig("hnsw")))
    assert s.changed and emb.embedded == []  # a new FAISS kind reuses the vectors
    with Retriever.open(idx, embedder=emb) as r:
        assert r._snap.manifest.faiss["kind"] == "hnsw"
        assert r._snap.manifest.chunking == {"chunk_tokens": 50, "chunk_overlap": 5}


def test_in_memory_documents_replace_upsert_delete(tmp_path, emb):
    idx = tmp_path / "idx"
    index_documents(docs({"1": "one fish", "2": "two fish"}), idx, embedder=emb)
    index_documents(docs({"3": "red fish"}), idx, embedder=emb, replace=False)
    assert set(_ids(idx, emb)) == {"1", "2", "3"}
    s = index_documents(docs({"1": "one fish", "4": "blue fish"}), idx, embedder=emb)  # replace
    assert (s.added, s.unchanged, s.removed) == (1, 1, 2)
    assert set(_ids(idx, emb)) == {"1", "4"}
    delete_documents(idx, ["4", "unknown"])
    assert set(_ids(idx, emb)) == {"1"}
    with pytest.raises(UsageError, match="empty"):
        delete_documents(idx, ["1"])
    with pytest.raises(UsageError, match="more than once"):
        index_documents(docs({"1": "a"}) + docs({"1": "b"}), idx, embedder=emb)
    with pytest.raises(IndexStoreError, match="no index"):
        delete_documents(tmp_path / "none", ["1"])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_faiss_kinds_search_correctly(tmp_path, kind):
    emb = CountingEmbedder(512)
    spec = {str(i): f"document number {i} about topic{i} and subject{i % 7}" for i in range(120)}
    idx = tmp_path / kind
    index_documents(docs(spec), idx, embedder=emb, config=IndexConfig(faiss=FaissConfig(kind, ivf_nprobe=64)))
    with Retriever.open(idx, embedder=emb) as r:
        assert r.search(spec["42"], k=1, mode="dense")[0].doc_id == "42"
    # incremental update carries the vectors over from any kind
    spec["42"] = "changed text entirely"
    index_documents(docs(spec), idx, embedder=emb)
    with Retriever.open(idx, embedder=emb) as r:
        assert r.search(spec["41"], k=1, mode="dense")[0].doc_id == "41"
        assert r.search("changed text entirely", k=1, mode="dense")[0].doc_id == "42"


def test_index_target_must_be_new_or_empty_and_is_never_indexed(tmp_path, emb):
    corpus = write_corpus(tmp_path / "docs")
    with pytest.raises(UsageError, match="is not an index and not empty"):
        build_index([corpus], corpus, embedder=emb)  # --index pointing at the documents folder
    assert not (corpus / "LOCK").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        build_index([corpus], tmp_path / "file", embedder=emb)
    inside = corpus / "idx"  # an index that lives inside the indexed folder never indexes its own files
    s1 = build_index([corpus], inside, embedder=emb)
    s2 = build_index([corpus], inside, embedder=emb)
    assert s1.documents == s2.documents == 4 and not s2.changed
