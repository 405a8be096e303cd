"""Retrieval quality on BEIR SciFact (Wadden et al. 2020; Thakur et al. 2021): dense, BM25 and hybrid.

Indexes the 5,183 abstracts (title + text, one document each) with the embedded all-MiniLM-L6-v2 and
evaluates the 300 test queries against ``qrels/test.tsv`` at the document level (a document's rank is
that of its best chunk): nDCG@10, Recall@10, Recall@100, MRR@10 (``ragloop.eval.metrics``).
Published reference points: all-MiniLM-L6-v2 dense nDCG@10 ~0.645, BM25 ~0.665.

    .venv/bin/python benchmarks/bench_retrieval.py [--index DIR] [--threads 2]

It also times an incremental update of the full index after one abstract changed (``reindex_one_doc_s``:
hash comparison of all documents, chunk + embed the changed one, rebuild BM25 and FAISS, write and fsync a
new generation); ``--index DIR`` keeps the index, so a second run skips the initial embedding.

Prints progress lines, then ONE JSON line: {"dataset": ..., "dense": {...}, "bm25": {...}, "hybrid": {...}}.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "scifact"


def load_queries(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8") as f:
        return {str(r["_id"]): r["text"] for r in map(json.loads, f) if r}


def load_qrels(path: Path) -> dict[str, dict[str, float]]:
    qrels: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = float(row["score"])
    return qrels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="BEIR SciFact folder")
    ap.add_argument("--index", type=Path, default=None, help="index directory (reused if it holds SciFact)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--precision", default="auto", help="embedder precision: auto | fp32 | bf16")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ragloop.eval.metrics import evaluate_retrieval
    from ragloop.retrieval import Retriever, SentenceTransformerEmbedder, index_documents, read_beir_corpus

    corpus = read_beir_corpus(args.data / "corpus.jsonl")
    queries = load_queries(args.data / "queries_test.jsonl")
    qrels = load_qrels(args.data / "qrels" / "test.tsv")
    qrels = {q: r for q, r in qrels.items() if q in queries}
    embedder = SentenceTransformerEmbedder(precision=args.precision)
    tmp = tempfile.TemporaryDirectory(prefix="ragloop-bench-")
    index = args.index or Path(tmp.name) / "scifact"
    t0 = time.perf_counter()
    def progress(stage: str, done: int, total: int) -> None:
        if stage == "embed":
            print(f"  embedded {done}/{total} chunks, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    summary = index_documents(corpus, index, embedder=embedder, progress=progress)
    print(f"indexed {summary.documents} docs / {summary.chunks} chunks ({summary.chunks_embedded} embedded, "
          f"precision {embedder.precision}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # Incremental update after one changed abstract, then back to the original (both timed, best reported).
    from ragloop.retrieval import SourceDocument

    i = len(corpus) // 2
    changed = list(corpus)
    changed[i] = SourceDocument.from_text(corpus[i].doc_id, corpus[i].text + " An added sentence about a new finding.")
    times, cpu = [], []
    for docs in (changed, corpus):
        t0, c0 = time.perf_counter(), time.process_time()
        s = index_documents(docs, index, embedder=embedder)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU seconds of this process: less sensitive to a shared machine
        assert (s.updated, s.unchanged) == (1, len(corpus) - 1), s
    print(f"re-index after one changed abstract: wall {times}, cpu {cpu}", file=sys.stderr)

    out: dict[str, object] = {
        "dataset": f"BEIR SciFact test ({len(qrels)} queries with qrels, {len(corpus)} docs)",
        "embedder": embedder.name, "precision": embedder.precision, "chunks": summary.chunks,
        "chunk_tokens": 200, "chunk_overlap": 32, "reindex_one_doc_s": round(min(times), 2),
        "reindex_one_doc_cpu_s": round(min(cpu), 2),
    }
    with Retriever.open(index, embedder=embedder) as r:
        for mode in ("dense", "bm25", "hybrid"):
            t0 = time.perf_counter()
            results = {q: [h.doc_id for h in r.search_documents(queries[q], k=100, mode=mode)] for q in qrels}
            m = evaluate_retrieval(results, qrels, ks=(10, 100))
            out[mode] = {k: round(m[k], 4) for k in ("ndcg@10", "recall@10", "recall@100", "mrr@10")}
            print(f"{mode:>6}: {out[mode]} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
