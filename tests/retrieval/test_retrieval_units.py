"""Pure helpers of the retrieval layer, checked on literal inputs."""

from __future__ import annotations

import numpy as np
import pytest

from ragloop.core.errors import UsageError
from ragloop.retrieval.chunking import Chunker, ChunkingConfig, TokenCounter, chunk_id_for
from ragloop.retrieval.embeddings import HashingEmbedder, hashing_features, l2_normalise, resolve_precision
from ragloop.retrieval.faiss_index import FaissConfig, ivf_lists
from ragloop.retrieval.fusion import reciprocal_rank_fusion
from ragloop.retrieval.loaders import SourceDocument, decode_text, display_path, json_to_text
from ragloop.retrieval.store import resolve_index_path


def test_rrf_known_values():
    fused = reciprocal_rank_fusion([["a", "b"], ["b", "c"]])
    assert [x for x, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 61)
    assert reciprocal_rank_fusion([[], []]) == []
    # weights scale each ranking's contribution
    w = reciprocal_rank_fusion([["a"], ["b"]], weights=[1.0, 2.0])
    assert [x for x, _ in w] == ["b", "a"]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], weights=[1.0, 2.0])


def test_l2_normalise_and_hashing_features_are_deterministic():
    np.testing.assert_allclose(l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]])
    a, b = hashing_features("Nucleus sampling", 64), hashing_features("nucleus SAMPLING", 64)
    np.testing.assert_array_equal(a, b)  # case-insensitive, no per-process salt
    assert np.abs(a).sum() == 3  # two words + one bigram
    e = HashingEmbedder(32)
    v = e.embed_documents(["a b c", "d"])
    assert v.shape == (2, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    assert e.embed_documents([]).shape == (0, 32)
    with pytest.raises(UsageError):
        HashingEmbedder(1)


def test_resolve_precision():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(UsageError):
        resolve_precision("fp8", "cpu")


def test_decode_text_is_strict():
    assert decode_text(b"\xef\xbb\xbfhi\r\nthere\r") == "hi\nthere\n"
    assert decode_text("héllo".encode("utf-16")) == "héllo"
    assert decode_text("x".encode("utf-32")) == "x"
    with pytest.raises(UnicodeDecodeError):
        decode_text(b"caf\xe9")


def test_json_to_text():
    assert json_to_text({"a": {"b": 1}, "c": ["x", "y"], "n": None}) == "a.b: 1\nc: x\nc: y"
    assert json_to_text("plain") == "plain"


def test_display_path_escapes_undecodable_bytes():
    name = b"/tmp/caf\xe9.txt".decode("utf-8", "surrogateescape")
    assert display_path(name) == "/tmp/caf\\xe9.txt"
    assert display_path("/tmp/ok.txt") == "/tmp/ok.txt"


def test_ivf_lists():
    assert ivf_lists(10_000) == 256
    assert ivf_lists(100) == 2
    assert ivf_lists(1) == 1
    with pytest.raises(UsageError):
        FaissConfig(kind="annoy")


def test_resolve_index_path(ragloop_home, tmp_path):
    assert resolve_index_path("mydocs") == ragloop_home / "indexes" / "mydocs"
    assert resolve_index_path("./x") == resolve_index_path("./x")
    assert str(resolve_index_path("./x")) == "x"
    assert resolve_index_path(str(tmp_path)) == tmp_path
    for bad in ("", "a b", "-x", "a\x00"):
        with pytest.raises(UsageError):
            resolve_index_path(bad)


def test_chunk_ids_are_stable_and_content_bound():
    a = chunk_id_for("doc", "h1", "sig", 0)
    assert a == chunk_id_for("doc", "h1", "sig", 0) and len(a) == 20
    assert len({a, chunk_id_for("doc", "h2", "sig", 0), chunk_id_for("doc", "h1", "sig", 1),
                chunk_id_for("doc", "h1", "sig2", 0)}) == 4


def test_token_counter_sums_cached_word_counts():
    calls = []

    def count(words):
        calls.append(list(words))
        return [len(w) for w in words]  # "tokens" = characters, to make the sum visible

    c = TokenCounter(count)
    c.prime("ab cde ab")
    assert len(calls) == 1 and sorted(calls[0]) == ["ab", "cde"]
    assert c("ab cde") == 5 and c("ab\n\nab") == 4 and c("") == 0
    assert len(calls) == 1  # all cached
    assert c("xyz") == 3 and len(calls) == 2


def test_chunking_config_validation():
    with pytest.raises(UsageError):
        ChunkingConfig(chunk_tokens=4)
    with pytest.raises(UsageError):
        ChunkingConfig(chunk_tokens=20, chunk_overlap=20)
    e = HashingEmbedder(16, max_tokens=50)
    with pytest.raises(UsageError, match="exceeds the embedder window"):
        Chunker(ChunkingConfig(100, 10), e.count_tokens, e.max_tokens)


def test_chunker_sizes_overlap_and_line_spans():
    e = HashingEmbedder(16)
    chunker = Chunker(ChunkingConfig(chunk_tokens=10, chunk_overlap=5), e.count_tokens, 12, additive=True)
    text = "\n".join(f"line{i} alpha beta gamma" for i in range(1, 9))  # 4 words per line, 8 lines
    doc = SourceDocument.from_text("d1", text, metadata={"k": "v"})
    chunks = chunker.chunk(doc)
    assert len(chunks) > 2
    assert all(len(c.text.split()) <= 10 for c in chunks)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for c in chunks:  # the line span points at the lines the chunk came from
        first = int(c.text.split()[0].removeprefix("line"))
        assert c.metadata["line_start"] == first
        assert c.metadata["line_end"] == first + c.text.count("\n")
        assert c.metadata["source"] == "d1"
    # overlap: consecutive chunks share text
    assert chunks[0].text.split("\n")[-1] in chunks[1].text
    assert [c.chunk_id for c in chunker.chunk(doc)] == [c.chunk_id for c in chunks]


def test_chunker_enforces_the_window_for_non_additive_counts():
    # A counter that says 1 token per word while splitting but 2 per word when counting exactly: the
    # splitter's estimate is too small, so the exact re-count must split again.
    e = HashingEmbedder(16)
    chunker = Chunker(ChunkingConfig(chunk_tokens=10, chunk_overlap=0), lambda ts: [2 * len(t.split()) for t in ts], 12)
    chunker._counter = TokenCounter(e.count_tokens)
    chunker._splitters.clear()
    pieces = chunker.split_text(" ".join(f"w{i}" for i in range(40)))
    assert all(2 * len(p.split()) <= 12 for p, _ in pieces)
    assert " ".join(p for p, _ in pieces).split() == [f"w{i}" for i in range(40)]


def test_code_files_use_language_separators():
    e = HashingEmbedder(16)
    chunker = Chunker(ChunkingConfig(chunk_tokens=12, chunk_overlap=0), e.count_tokens, 50, additive=True)
    src = "def a():\n    return 1 + 2 + 3 + 4\n\ndef b():\n    return 5 + 6 + 7 + 8\n"
    doc = SourceDocument.from_text("x.py", src)
    doc.metadata["language"] = "python"
    texts = [c.text for c in chunker.chunk(doc)]
    assert texts[0].startswith("def a") and any(t.startswith("def b") for t in texts)


def test_vectorised_bm25_equals_bm25s():
    import bm25s

    from ragloop.retrieval.bm25 import BM25Config, BM25Tokenizer, build_bm25_from_tokens, search_bm25

    texts = ["the cat sat on the mat", "dogs and cats are pets", "a dog chased the cat around the yard",
             "stock markets fell", "", "cat cat cat"]
    cfg = BM25Config()
    tok = BM25Tokenizer(cfg)
    tokens = tok(texts)
    ref = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    ref.index(tokens, show_progress=False)
    ours = build_bm25_from_tokens(tokens, cfg)
    for q in ("cat", "dog pets", "markets", "cat yard mat"):
        qt = tok([q])[0]
        np.testing.assert_allclose(ours.get_scores(qt), ref.get_scores(qt), rtol=1e-6)
    assert search_bm25(ours, tok, "cat", 3)[0][0] == 5  # "cat cat cat", the shortest with the most cats
