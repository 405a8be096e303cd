"""Retrieval: loaders, token-sized chunking, embedders, a crash-safe FAISS + BM25 index, hybrid search.

Public API::

    from ragloop.retrieval import Retriever, build_index, index_documents, read_beir_corpus
    summary = build_index(["./docs"], "mydocs")             # incremental; ~/.ragloop/indexes/mydocs
    hits = Retriever.open("mydocs").search("nucleus sampling", k=5, mode="hybrid")

Heavy libraries (torch, faiss, bm25s) are imported inside functions, so importing this package is cheap.
See ARCHITECTURE.md (Retrieval) and SECURITY.md §2-§3 for the on-disk format and bad-input rules.
"""

from ragloop.retrieval.bm25 import BM25Config
from ragloop.retrieval.chunking import Chunk, Chunker, ChunkingConfig
from ragloop.retrieval.docstore import ChunkRecord, DocumentRecord
from ragloop.retrieval.embeddings import (
    DEFAULT_EMBEDDER_NAME,
    Embedder,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    load_embedder,
)
from ragloop.retrieval.faiss_index import FaissConfig
from ragloop.retrieval.fusion import reciprocal_rank_fusion
from ragloop.retrieval.indexer import (
    EXIT_PARTIAL,
    IndexConfig,
    IndexSummary,
    build_index,
    delete_documents,
    index_documents,
)
from ragloop.retrieval.loaders import (
    FileProblem,
    Segment,
    SourceDocument,
    discover_files,
    documents_from_records,
    load_file,
    read_beir_corpus,
)
from ragloop.retrieval.retriever import SEARCH_MODES, Hit, Retriever, SearchMode
from ragloop.retrieval.store import StoreOps, index_stats, resolve_index_path, verify_index

__all__ = [
    "BM25Config", "Chunk", "ChunkRecord", "Chunker", "ChunkingConfig", "DEFAULT_EMBEDDER_NAME", "DocumentRecord",
    "EXIT_PARTIAL", "Embedder", "FaissConfig", "FileProblem", "HashingEmbedder", "Hit", "IndexConfig",
    "IndexSummary", "Retriever", "SEARCH_MODES", "SearchMode", "Segment", "SentenceTransformerEmbedder",
    "SourceDocument", "StoreOps", "build_index", "delete_documents", "discover_files", "documents_from_records",
    "index_documents", "index_stats", "load_embedder", "load_file", "read_beir_corpus", "reciprocal_rank_fusion",
    "resolve_index_path", "verify_index",
]
