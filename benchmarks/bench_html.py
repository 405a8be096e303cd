"""Retrieval on HTML pages: the block-aware, boilerplate-dropping loader against the old one (same run).

The corpus is built in a temporary directory from BEIR SciFact (Wadden et al. 2020): each abstract becomes
a realistic web page — a site header and navigation menu, a breadcrumb, a "related articles" sidebar that
lists the titles of five *other* abstracts (the kind of boilerplate that misleads retrieval), the abstract
as paragraphs with inline links and emphasis, a cookie banner and a footer. The queries are SciFact test
claims whose evidence documents are in the sample; distractor pages fill the corpus up to ``--docs``.

Both loaders index the same pages with the same embedder (all-MiniLM-L6-v2 unless ``--embedder``) and
chunking; document-level nDCG@10 / Recall@10 / MRR@10 for dense, BM25 and hybrid search, plus the share of
chunks that carry boilerplate text. The baseline ("before") is the previous loader: ``get_text("\\n")`` of
the whole page minus scripts, one segment.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_html.py [--docs 400] [--queries 100] [--threads 1]

Prints progress on stderr, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "scifact"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_retrieval import load_qrels, load_queries  # noqa: E402

NAV = ["Home", "Journals", "Topics", "Authors", "Submit a manuscript", "About us", "Contact", "Log in", "Sign up"]
BOILER_MARKERS = ("We use cookies", "All rights reserved", "Related articles", "Submit a manuscript", "You are here")


def make_page(doc: dict, related: list[dict], rng: random.Random) -> str:
    """One SciFact abstract as a web page with navigation boilerplate and inline markup."""
    sents = re.split(r"(?<=[.!?])\s+", doc["text"].strip())
    paras, cur = [], []
    for s in sents:
        words = s.split()
        for i in range(len(words)):  # inline tags inside sentences: links and emphasis
            if rng.random() < 0.12:
                words[i] = f'<a href="/term/{i}">{words[i]}</a>' if rng.random() < 0.5 else f"<em>{words[i]}</em>"
        cur.append(" ".join(words))
        if len(cur) == 3:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    body = "\n".join(f"<p>{' '.join(p)}</p>" for p in paras)
    nav = "".join(f'<li><a href="/{n.lower()}">{n}</a></li>' for n in NAV)
    side = "".join(f'<li><a href="/doc/{r["_id"]}">{r["title"]}</a></li>' for r in related)
    return f"""<!doctype html><html><head><title>{doc["title"]} | Science Portal</title></head><body>
<header class="site-header"><a class="logo" href="/">Science Portal</a><form><input name="q"></form></header>
<nav class="main-menu"><ul>{nav}</ul></nav>
<div class="breadcrumbs">You are here: <a href="/">Home</a> › <a href="/topics">Topics</a> › Article</div>
<div class="container"><main><article><h1>{doc["title"]}</h1>
<p class="byline">Published in <em>Journal of Examples</em></p>
{body}
</article></main>
<aside class="sidebar"><h3>Related articles</h3><ul>{side}</ul></aside></div>
<div class="cookie-banner">We use cookies to give you the best experience. <button>Accept</button></div>
<footer class="site-footer"><p>© 2024 Science Portal. All rights reserved.</p><ul>{nav}</ul></footer>
</body></html>"""


def parse_before(text: str) -> str:
    """The previous loader, verbatim: scripts removed, ``get_text("\\n")``, one segment."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    body = soup.get_text("\n")
    return re.sub(r"\n\s*\n+", "\n\n", body).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="BEIR SciFact folder")
    ap.add_argument("--docs", type=int, default=400, help="pages in the corpus")
    ap.add_argument("--queries", type=int, default=100, help="test claims (their evidence pages are included)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--embedder", default="default", help="default (all-MiniLM-L6-v2) or hashing (fast, no model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ragloop.eval.metrics import evaluate_retrieval
    from ragloop.retrieval import Retriever, SourceDocument, index_documents
    from ragloop.retrieval.embeddings import load_embedder
    from ragloop.retrieval.loaders import Segment, parse_file

    rng = random.Random(args.seed)
    rows = {}
    with (args.data / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[str(r["_id"])] = r
    queries = load_queries(args.data / "queries_test.jsonl")
    qrels = {q: rel for q, rel in load_qrels(args.data / "qrels" / "test.tsv").items() if q in queries}
    qids = sorted(qrels, key=int)[: args.queries]
    chosen = list(dict.fromkeys(d for q in qids for d in qrels[q] if d in rows))
    others = [d for d in rows if d not in set(chosen)]
    rng.shuffle(others)
    chosen += others[: max(0, args.docs - len(chosen))]
    qrels = {q: qrels[q] for q in qids}

    tmp = Path(tempfile.mkdtemp(prefix="ragloop-bench-html-"))
    pages = {}
    for d in chosen:
        related = [rows[x] for x in rng.sample(chosen, 6) if x != d][:5]
        pages[d] = make_page(rows[d], related, rng)
    html_bytes = sum(len(p.encode()) for p in pages.values())
    print(f"{len(pages)} pages ({html_bytes / 1e6:.1f} MB of HTML), {len(qids)} queries", file=sys.stderr)

    def docs_before() -> list[SourceDocument]:
        return [SourceDocument(doc_id=d, segments=[Segment(parse_before(p), {})], title=rows[d]["title"])
                for d, p in pages.items()]

    def docs_after() -> list[SourceDocument]:
        out = []
        for d, p in pages.items():
            doc = parse_file(Path(f"{d}.html"), p.encode())
            doc.doc_id = d
            out.append(doc)
        return out

    embedder = load_embedder(args.embedder)
    result: dict[str, object] = {
        "bench": "html_loader", "dataset": f"SciFact test claims as HTML pages ({len(pages)} pages, {len(qids)} "
        f"queries with qrels, nav/sidebar/cookie/footer boilerplate, inline links)", "embedder": embedder.name,
        "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for name, build in (("before", docs_before), ("after", docs_after)):
        t0, c0 = time.perf_counter(), time.process_time()
        docs = build()
        parse_s = time.perf_counter() - t0
        index = tmp / name
        summary = index_documents(docs, str(index), embedder=embedder)
        index_s, index_cpu = time.perf_counter() - t0, time.process_time() - c0
        r = Retriever.open(str(index), embedder=embedder)
        chunks = [h.text for d in docs for h in r.chunks_of(d.doc_id)]
        boiler = sum(any(m in c for m in BOILER_MARKERS) for c in chunks) / max(len(chunks), 1)
        part: dict[str, object] = {"chunks": summary.chunks, "chunks_with_boilerplate": round(boiler, 3),
                                   "parse_s": round(parse_s, 2), "index_s": round(index_s, 1),
                                   "index_cpu_s": round(index_cpu, 1)}
        for mode in ("dense", "bm25", "hybrid"):
            res = {q: [h.doc_id for h in r.search_documents(queries[q], k=10, mode=mode)] for q in qids}
            m = evaluate_retrieval(res, qrels, ks=(10,))
            part[mode] = {k: round(m[k], 4) for k in ("ndcg@10", "recall@10", "mrr@10")}
        r.close()
        result[name] = part
        print(f"{name}: {part}", file=sys.stderr, flush=True)
    b, a = result["before"], result["after"]
    result["ndcg@10_ratio"] = {m: round(a[m]["ndcg@10"] / max(b[m]["ndcg@10"], 1e-9), 3)  # type: ignore[index]
                               for m in ("dense", "bm25", "hybrid")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
