"""End-to-end on the real embedded all-MiniLM-L6-v2 (one model load for the whole session)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from retrieval_helpers import TOPICS, write_corpus

from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval import (
    DEFAULT_EMBEDDER_NAME,
    Chunker,
    ChunkingConfig,
    Retriever,
    SentenceTransformerEmbedder,
    build_index,
    read_beir_corpus,
)

pytestmark = pytest.mark.e2e
SCIFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "scifact" / "corpus.jsonl"


def test_embedder_contract_and_precision(minilm):
    assert (minilm.name, minilm.dimension, minilm.max_tokens) == (DEFAULT_EMBEDDER_NAME, 384, 254)
    texts = ["Nucleus sampling keeps the most likely tokens.", "FAISS searches dense vectors.", "short"]
    v = minilm.embed_documents(texts)  # (3, 384)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    ref = minilm.model.encode(texts, normalize_embeddings=True) if minilm.precision == "fp32" else None
    if ref is None:  # bf16 model loaded: compare to a plain fp32 sentence-transformers encode
        from sentence_transformers import SentenceTransformer

        fp32 = SentenceTransformer(str(minilm.model_path), device="cpu")
        ref = fp32.encode(texts, normalize_embeddings=True)
    cos = (v * ref).sum(axis=1)
    assert cos.min() >= 0.99, cos
    np.testing.assert_allclose(minilm.embed_query(texts[0]), v[0], atol=2e-3)


def test_no_silent_truncation(minilm, caplog):
    long = "word " * 600
    with pytest.raises(UsageError, match="exceed the embedder window of 254 tokens"):
        minilm.embed_documents([long])
    with caplog.at_level(logging.WARNING):
        assert minilm.embed_query(long).shape == (384,)
    assert "reads only the first 254" in caplog.text


def test_chunks_match_langchains_token_splitter(minilm):
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    docs = read_beir_corpus(SCIFACT)[:40]
    ours = Chunker(ChunkingConfig(200, 32), minilm.count_tokens, minilm.max_tokens,
                   additive=minilm.token_counts_additive)
    theirs = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(minilm.tokenizer, chunk_size=200, chunk_overlap=32)
    for d in docs:
        assert [c.text for c in ours.chunk(d)] == theirs.split_text(d.text)
    assert minilm.token_counts_additive


def test_semantic_search_on_files(tmp_path, minilm):
    corpus = write_corpus(tmp_path / "docs", TOPICS)
    s = build_index([corpus], tmp_path / "idx", embedder=minilm)
    assert s.documents == 4 and s.embedder == DEFAULT_EMBEDDER_NAME
    with Retriever.open(tmp_path / "idx", embedder=minilm) as r:
        # no word in common with the target document: only the dense side can find it
        hit = r.search("reinforcement learning algorithm that limits how far each update moves", k=1, mode="dense")[0]
        assert hit.source.endswith("ppo.md") and hit.score > 0.2
        assert r.search("how are tokens chosen when decoding text", k=1, mode="hybrid")[0].source.endswith("sampling.md")
    with pytest.raises(IndexStoreError, match="built with embedder"):
        from ragloop.retrieval import HashingEmbedder

        Retriever.open(tmp_path / "idx", embedder=HashingEmbedder(384))


def test_local_model_directory_by_path(tmp_path, minilm):
    e = SentenceTransformerEmbedder(minilm.model_path, precision="fp32")
    assert e.name == "model" and e.spec()["path"] == str(minilm.model_path)  # the wheel's folder name
    with pytest.raises(Exception, match="not found"):
        SentenceTransformerEmbedder(tmp_path / "nope")
