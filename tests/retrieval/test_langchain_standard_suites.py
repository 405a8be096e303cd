"""LangChain's own standard test suites (``langchain-tests``) run against ragloop's retrieval adapters:
``RagloopEmbeddings`` (unit on the hashing embedder, integration on the embedded MiniLM),
``RagloopVectorStore`` (a real crash-safe index on disk, with LangChain's fake embeddings as the suite
asks) and ``RagloopRetriever`` (a real FAISS + BM25 index)."""

from __future__ import annotations

import tempfile
from collections.abc import Generator
from pathlib import Path

import pytest
from langchain_core.vectorstores import VectorStore
from langchain_tests.integration_tests import (
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import EmbeddingsUnitTests

from ragloop.retrieval import HashingEmbedder, index_documents
from ragloop.retrieval.langchain_adapters import RagloopEmbeddings, RagloopRetriever, RagloopVectorStore
from ragloop.retrieval.loaders import SourceDocument
from ragloop.retrieval.retriever import Retriever


class TestRagloopEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[RagloopEmbeddings]:
        return RagloopEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"embedder": HashingEmbedder(64)}


@pytest.mark.e2e
class TestRagloopEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[RagloopEmbeddings]:
        return RagloopEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {}  # the embedded all-MiniLM-L6-v2


class TestRagloopVectorStore(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self) -> Generator[VectorStore, None, None]:  # type: ignore[override]
        with tempfile.TemporaryDirectory() as tmp:
            yield RagloopVectorStore(Path(tmp) / "vs", self.get_embeddings())

    @property
    def has_async(self) -> bool:
        return True  # VectorStore's default async methods run the sync ones in a thread


TEXTS = {
    "cats": "Cats purr when they are happy and sleep most of the day.",
    "dogs": "Dogs bark at strangers and love long walks.",
    "market": "The stock market fell sharply after the announcement.",
    "rain": "Rain is water falling from clouds in drops.",
    "sun": "The sun is a star at the centre of the solar system.",
    "moon": "The moon orbits the earth once a month.",
}


class TestRagloopRetriever(RetrieversIntegrationTests):
    _index: Path | None = None

    @property
    def retriever_constructor(self) -> type[RagloopRetriever]:
        return RagloopRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        cls = type(self)
        if cls._index is None:
            root = Path(tempfile.mkdtemp(prefix="ragloop-lc-retriever-")) / "idx"
            index_documents([SourceDocument.from_text(k, v) for k, v in TEXTS.items()], root,
                            embedder=HashingEmbedder(64))
            cls._index = root
        return {"retriever": Retriever.open(cls._index, embedder=HashingEmbedder(64)), "mode": "hybrid"}

    @property
    def retriever_query_example(self) -> str:
        return "what do cats do when happy?"
