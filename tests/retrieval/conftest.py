"""Fixtures for the retrieval tests: the tiny hashing embedder, and the real MiniLM once per session."""

from __future__ import annotations

import pytest

from ragloop.retrieval import HashingEmbedder


@pytest.fixture
def emb() -> HashingEmbedder:
    return HashingEmbedder(64)


@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2 (loaded once for every e2e test)."""
    from ragloop.retrieval import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()
