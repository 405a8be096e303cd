"""A writer killed at every write / fsync / replace step leaves the old or the new index, never a broken one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from retrieval_helpers import docs

from ragloop.retrieval import index_documents

OLD = {"a": "alpha apples are red", "b": "bravo bananas are yellow", "c": "charlie cherries"}
MID = {"a": "alpha apples", "b": "bravo bananas are yellow", "c": "charlie cherries"}
NEW = {"a": "alpha apples are green now", "b": "bravo bananas are yellow", "d": "delta dates are sweet"}


def test_writer_killed_at_every_step(tmp_path, emb):
    template = tmp_path / "template"
    index_documents(docs(MID), template, embedder=emb)
    index_documents(docs(OLD), template, embedder=emb)  # two generations, so the save also garbage-collects
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    helper = Path(__file__).with_name("fault_writer.py")
    out = subprocess.run([sys.executable, str(helper), str(template), str(work), json.dumps(NEW)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    head, results = lines[0], lines[1:]
    old, new = head["old"], head["new"]
    assert old["ids"] == sorted(OLD) and new["ids"] == sorted(NEW)
    assert len(results) == head["dry_steps"] >= 25
    kinds = {r["kind"] for r in results}
    assert {"mkdir", "open", "write", "fsync", "fsync_dir", "replace", "remove"} <= kinds
    replace_step = next(r["n"] for r in results if r["kind"] == "replace")
    for r in results:
        assert r["exit"] == 77, r  # it really died at that step
        after = r["after"]
        assert "error" not in after, r
        state = "old" if (after["ids"], after["texts"]) == (old["ids"], old["texts"]) else (
            "new" if (after["ids"], after["texts"]) == (new["ids"], new["texts"]) else "other")
        # before the pointer is replaced the old generation is current, after it the new one
        assert state == ("old" if r["n"] <= replace_step else "new"), r
        assert r["rerun"]["ids"] == new["ids"] and r["rerun"]["texts"] == new["texts"], r
        assert len(r["gens"]) <= 3, r  # at most: previous, current, one unpublished
