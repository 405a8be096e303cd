"""The LangChain adapters inside real LangChain chains (langchain-core 1.x)."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
from langchain_core.vectorstores import VectorStore
from retrieval_helpers import docs

from ragloop.core.errors import UsageError
from ragloop.retrieval import HashingEmbedder, index_documents
from ragloop.retrieval.langchain_adapters import (
    LangChainEmbedder,
    RagloopEmbeddings,
    RagloopRetriever,
    RagloopVectorStore,
)

TEXTS = ["cats purr when they are happy", "dogs bark at strangers", "the stock market fell sharply"]


def test_embeddings_adapter(emb):
    e = RagloopEmbeddings(emb)
    assert isinstance(e, Embeddings)
    vecs = e.embed_documents(TEXTS)
    assert len(vecs) == 3 and len(vecs[0]) == 64 and isinstance(vecs[0][0], float)
    assert e.embed_query(TEXTS[0]) == pytest.approx(vecs[0], abs=1e-6)


def test_retriever_in_a_chain(tmp_path, emb):
    index_documents(docs({"c": TEXTS[0], "d": TEXTS[1], "s": TEXTS[2]}), tmp_path / "idx", embedder=emb)
    retriever = RagloopRetriever.from_index(tmp_path / "idx", embedder=emb, k=2, mode="hybrid")
    assert isinstance(retriever, BaseRetriever)
    chain = RunnableParallel(context=retriever | RunnableLambda(lambda ds: "\n".join(d.page_content for d in ds)),
                             question=RunnablePassthrough()) | RunnableLambda(
        lambda x: f"Q: {x['question']}\nContext:\n{x['context']}")
    out = chain.invoke("why does the stock market fall")
    assert out.startswith("Q: why does the stock market fall") and TEXTS[2] in out
    got = retriever.invoke("dogs bark")
    assert isinstance(got[0], Document) and got[0].metadata["doc_id"] == "d" and got[0].id == got[0].metadata["chunk_id"]
    assert retriever.batch(["cats", "dogs"])[1][0].metadata["doc_id"] == "d"


def test_vector_store_contract(tmp_path, emb):
    vs = RagloopVectorStore(tmp_path / "vs", emb)
    assert isinstance(vs, VectorStore)
    assert vs.similarity_search("anything") == [] and vs.get_by_ids(["x"]) == []
    ids = vs.add_texts(TEXTS, [{"n": 0}, {"n": 1}, {"n": 2}], ids=["c", "d", "s"])
    assert ids == ["c", "d", "s"]
    docs_ = vs.get_by_ids(["s", "missing", "c"])
    assert [(d.id, d.page_content, d.metadata) for d in docs_] == [("s", TEXTS[2], {"n": 2}), ("c", TEXTS[0], {"n": 0})]
    results = vs.similarity_search_with_score("dogs bark loudly", k=2)
    assert results[0][0].id == "d" and results[0][0].metadata["n"] == 1 and results[0][1] > results[1][1]
    assert vs.similarity_search_with_relevance_scores("dogs bark", k=1)[0][1] <= 1.0
    # upsert by id, and add_documents with Document ids
    vs.add_texts(["dogs howl at the moon"], ids=["d"])
    assert vs.get_by_ids(["d"])[0].page_content == "dogs howl at the moon"
    new_ids = vs.add_documents([Document(page_content="parrots talk", id="p")])
    assert new_ids == ["p"] and vs.get_by_ids(["p"])[0].page_content == "parrots talk"
    auto = vs.add_texts(["no id given"])
    assert len(auto) == 1 and vs.get_by_ids(auto)[0].page_content == "no id given"
    assert vs.delete(["c"]) is True and vs.get_by_ids(["c"]) == []
    # as a retriever in a chain
    chain = vs.as_retriever(search_kwargs={"k": 1}) | RunnableLambda(lambda ds: ds[0].page_content)
    assert chain.invoke("talking parrots") == "parrots talk"
    with pytest.raises(ValueError):
        vs.add_texts(["a", "b"], ids=["only-one"])
    with pytest.raises(UsageError):
        vs.add_texts([" "])


def test_from_texts_and_foreign_embeddings(tmp_path, emb):
    class Foreign(Embeddings):  # any LangChain embeddings object
        def embed_documents(self, texts):
            return emb.embed_documents(texts).tolist()

        def embed_query(self, text):
            return emb.embed_query(text).tolist()

    vs = RagloopVectorStore.from_texts(TEXTS, Foreign(), ids=["c", "d", "s"], index_path=tmp_path / "vs")
    assert isinstance(vs._embedder, LangChainEmbedder) and vs._embedder.dimension == 64
    assert vs.similarity_search("stock market", k=1)[0].id == "s"
    assert isinstance(vs.embeddings, Foreign)
    with pytest.raises(UsageError, match="index_path"):
        RagloopVectorStore.from_texts(TEXTS, RagloopEmbeddings(HashingEmbedder(8)))
