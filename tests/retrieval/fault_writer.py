"""Subprocess helper of test_index_faults.py (not a test): kill an index writer at every filesystem step.

Usage: ``python fault_writer.py TEMPLATE_INDEX WORK_DIR NEW_DOCS_JSON``. A dry run records the steps of one
save; then for each step N a forked child copies nothing, opens the template's copy and saves the new
documents with ``os._exit(77)`` injected at step N (no cleanup, no flush — like a power cut for this
process). The parent then loads whatever is on disk, re-runs the writer normally, and prints one JSON line
per step. Forking after the imports keeps this fast; OMP/BLAS are single-threaded (set by the test) so the
fork is safe.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ragloop.retrieval import HashingEmbedder, SourceDocument, StoreOps, index_documents
from ragloop.retrieval.store import generation_dirs, load_snapshot


def _docs(spec: dict[str, str]) -> list[SourceDocument]:
    return [SourceDocument.from_text(k, v) for k, v in spec.items()]


def _state(root: Path) -> dict:
    try:
        snap = load_snapshot(root)
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        return {"error": f"{type(e).__name__}: {e}"}
    ids = sorted(d.doc_id for d in snap.docstore.documents())
    texts = {d.doc_id: d.text for d in snap.docstore.documents()}
    snap.docstore.close()
    return {"generation": snap.generation, "ids": ids, "texts": texts}


def main() -> None:
    template, work, new_json = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    new = json.loads(new_json)
    emb = HashingEmbedder(64)
    steps: list[tuple[int, str, str]] = []
    dry = work / "dry"
    shutil.copytree(template, dry)
    index_documents(_docs(new), dry, embedder=emb, store_ops=StoreOps(hook=lambda n, k, p: steps.append((n, k, p))))
    print(json.dumps({"dry_steps": len(steps), "old": _state(template), "new": _state(dry)}), flush=True)
    for n, kind, path in steps:
        dest = work / f"kill-{n}"
        shutil.copytree(template, dest)
        pid = os.fork()
        if pid == 0:  # the writer
            def hook(i: int, k: str, p: str, n: int = n) -> None:
                if i == n:
                    os._exit(77)
            try:
                index_documents(_docs(new), dest, embedder=emb, store_ops=StoreOps(hook=hook))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        after = _state(dest)
        gens = [p.name for _, p in generation_dirs(dest)]
        index_documents(_docs(new), dest, embedder=emb)  # the next writer must recover
        rerun = _state(dest)
        print(json.dumps({"n": n, "kind": kind, "path": path.replace(str(dest), ""), "exit":
                          os.waitstatus_to_exitcode(status), "after": after, "gens": gens, "rerun": rerun}),
              flush=True)
        shutil.rmtree(dest)


if __name__ == "__main__":
    main()
