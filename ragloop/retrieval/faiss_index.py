"""Dense vector index on FAISS (Johnson, Douze & Jégou 2019, "Billion-scale similarity search with GPUs").

Vectors are L2-normalised, so inner product is cosine similarity. Kinds:
- ``flat``: exact search (``IndexFlatIP``), the default; right up to a few hundred thousand chunks;
- ``hnsw``: graph search (Malkov & Yashunin 2018), ``IndexHNSWFlat`` with M=32, for large corpora;
- ``ivf``: inverted lists (``IndexIVFFlat``), k-means coarse quantiser with ~4·sqrt(N) lists.

Indexes are (de)serialised to bytes with ``faiss.serialize_index`` — FAISS's own binary format, no pickle —
so that the store can hash and write them through its crash-safe path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragloop.core.errors import IndexStoreError, UsageError

FAISS_KINDS = ("flat", "hnsw", "ivf")


@dataclass(frozen=True)
class FaissConfig:
    """Which FAISS index to build."""

    kind: str = "flat"  # flat | hnsw | ivf
    hnsw_m: int = 32  # graph degree (HNSW)
    hnsw_ef_search: int = 64  # search breadth (HNSW); higher = better recall, slower
    ivf_nprobe: int = 16  # lists visited per query (IVF)

    def __post_init__(self) -> None:
        if self.kind not in FAISS_KINDS:
            raise UsageError(f"unknown FAISS index kind {self.kind!r}", hint=f"use one of {', '.join(FAISS_KINDS)}")


def ivf_lists(n: int) -> int:
    """Number of IVF lists for n vectors: ~4·sqrt(n), at least 1, and at least 39 training points per list.

    ``ivf_lists(10000) -> 256``, ``ivf_lists(100) -> 2``
    """
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_faiss(vectors: np.ndarray, config: FaissConfig) -> Any:
    """An index over ``vectors`` (N, D) float32; row i of ``vectors`` is id i."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    d = x.shape[1]
    if config.kind == "flat" or len(x) == 0:
        index = faiss.IndexFlatIP(d)
    elif config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        nlist = ivf_lists(len(x))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    if len(x):
        index.add(x)
    return index


def configure_search(index: Any, config: FaissConfig) -> None:
    """Set query-time parameters (they are not part of the serialised index)."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(config.ivf_nprobe, ivf.nlist)


def all_vectors(index: Any) -> np.ndarray:
    """Every stored vector, (N, D) float32, in id order (used to carry unchanged chunks to a new generation)."""
    import faiss

    n = index.ntotal
    if n == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return np.asarray(index.reconstruct_n(0, n), dtype=np.float32)  # (N, D)


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes, *, what: str) -> Any:
    """Read an index from bytes; a damaged buffer is an ``IndexStoreError`` naming ``what``."""
    import faiss

    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except (RuntimeError, ValueError) as e:
        raise IndexStoreError(f"cannot read the FAISS index {what}: {str(e).splitlines()[0][:200]}") from None


def search(index: Any, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Top-k (row, inner product) for one query vector (D,), best first; missing slots are dropped."""
    k = min(k, index.ntotal)
    if k <= 0:
        return []
    scores, ids = index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)  # (1, k)
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
