"""The on-disk index (SECURITY.md §2): damaged files, mismatches, disk full, two writers, readers during writes."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from retrieval_helpers import docs

from ragloop.core.errors import IndexStoreError
from ragloop.retrieval import HashingEmbedder, Retriever, StoreOps, index_documents, verify_index
from ragloop.retrieval.store import MANIFEST, POINTER, generation_dirs, load_snapshot, writer_lock

A = {"a": "alpha apples are red", "b": "bravo bananas are yellow", "c": "charlie cherries are dark red"}
B = {"a": "alpha apples are green now", "b": "bravo bananas are yellow", "d": "delta dates are sweet"}


@pytest.fixture
def index(tmp_path, emb):
    root = tmp_path / "idx"
    index_documents(docs(A), root, embedder=emb)
    return root


def _current(root: Path) -> Path:
    return root / json.loads((root / POINTER).read_text())["generation"]


def _doc_ids(root: Path, emb) -> set[str]:
    with Retriever.open(root, embedder=emb) as r:
        return {d.doc_id for d in r.documents()}


def _rehash(root: Path, rel: str, data: bytes, manifest_edit=None) -> None:
    """Replace a file of the current generation with *consistent* hashes (a well-formed but wrong index)."""
    gen = _current(root)
    (gen / rel).write_bytes(data)
    m = json.loads((gen / MANIFEST).read_text())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    if manifest_edit:
        manifest_edit(m)
    mb = (json.dumps(m) + "\n").encode()
    (gen / MANIFEST).write_bytes(mb)
    (root / POINTER).write_text(json.dumps({"generation": gen.name, "manifest_sha256": hashlib.sha256(mb).hexdigest()}))


def test_roundtrip_generations_and_gc(index, emb):
    assert _doc_ids(index, emb) == set(A)
    index_documents(docs(B), index, embedder=emb)
    index_documents(docs(A), index, embedder=emb)
    assert [p.name for _, p in generation_dirs(index)] == ["gen-000002", "gen-000003"]  # current + previous
    assert _doc_ids(index, emb) == set(A)
    report = verify_index(index)
    assert report["generations"] == {"gen-000002": "ok (previous)", "gen-000003": "ok (current)"}
    assert not list(index.rglob("*.pkl")) and not list(index.rglob("*.pickle"))


def _files(index: Path) -> list[str]:
    gen = _current(index)
    return sorted(str(p.relative_to(gen)) for p in gen.rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_every_damaged_file_is_detected(index, damage):
    rels = _files(index)
    assert {"manifest.json", "vectors.faiss", "docstore.sqlite"} <= set(rels) and any(r.startswith("bm25/") for r in rels)
    for rel in rels + [POINTER]:
        path = index / POINTER if rel == POINTER else _current(index) / rel
        original = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(original[: len(original) // 2])
        else:
            flipped = bytearray(original)
            flipped[len(flipped) // 2] ^= 0x01
            path.write_bytes(bytes(flipped))
        with pytest.raises(IndexStoreError) as e:
            load_snapshot(index)
        msg = str(e.value)
        assert "damaged" in msg or "invalid" in msg, (rel, msg)
        assert "--rebuild" in (e.value.hint or ""), rel
        path.write_bytes(original)
    load_snapshot(index)  # restored


def test_pointer_cannot_escape_the_index(index):
    (index / POINTER).write_text(json.dumps({"generation": "../../etc", "manifest_sha256": "0" * 64}))
    with pytest.raises(IndexStoreError, match="invalid generation"):
        load_snapshot(index)


def test_missing_generation_file(index):
    (_current(index) / "vectors.faiss").unlink()
    with pytest.raises(IndexStoreError, match="missing"):
        load_snapshot(index)


def test_count_mismatch_is_detected(index):
    fewer = faiss.IndexFlatIP(64)
    fewer.add(np.eye(64, dtype=np.float32)[:2])
    _rehash(index, "vectors.faiss", faiss.serialize_index(fewer).tobytes())
    with pytest.raises(IndexStoreError, match="2 vectors for 3 chunks"):
        load_snapshot(index)


def test_manifest_count_mismatch_is_detected(index):
    gen = _current(index)
    rel = "docstore.sqlite"
    _rehash(index, rel, (gen / rel).read_bytes(), lambda m: m["counts"].update(documents=5))
    with pytest.raises(IndexStoreError, match="docstore holds 3 documents"):
        load_snapshot(index)


def test_dimension_mismatches(index, emb):
    gen = _current(index)
    rel = "vectors.faiss"
    _rehash(index, rel, (gen / rel).read_bytes(), lambda m: m["embedder"].update(dimension=32))
    with pytest.raises(IndexStoreError, match="dimension 64, the manifest says 32"):
        load_snapshot(index)


def test_querying_with_another_embedder_is_an_error(index):
    with pytest.raises(IndexStoreError, match="built with embedder 'hashing-64'") as e:
        Retriever.open(index, embedder=HashingEmbedder(32))
    assert "hashing-32" in str(e.value)
    with pytest.raises(IndexStoreError, match="built with embedder"):
        index_documents(docs(B), index, embedder=HashingEmbedder(32))


@pytest.mark.parametrize("fail_at", ["write", "fsync", "open"])
def test_disk_full_during_save_keeps_the_old_index(index, emb, fail_at):
    before = sorted(p.name for _, p in generation_dirs(index))
    seen = []

    def hook(n, kind, path):
        if kind == fail_at and "docstore" in path:
            seen.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(IndexStoreError, match="disk full") as e:
        index_documents(docs(B), index, embedder=emb, store_ops=StoreOps(hook=hook))
    assert "previous index is unchanged" in str(e.value) and seen
    assert sorted(p.name for _, p in generation_dirs(index)) == before  # partial generation removed
    assert _doc_ids(index, emb) == set(A)
    index_documents(docs(B), index, embedder=emb)  # the lock was released; the next save works
    assert _doc_ids(index, emb) == set(B)


def test_second_writer_fails_fast_naming_the_holder(index, emb):
    code = (
        "import sys; from pathlib import Path; from ragloop.retrieval.store import writer_lock\n"
        f"with writer_lock(Path({str(index)!r})):\n"
        "    print('locked', flush=True); sys.stdin.readline()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexStoreError, match=f"pid {holder.pid}") as e:
            index_documents(docs(B), index, embedder=emb)
        assert "one writer at a time" in (e.value.hint or "")
        assert _doc_ids(index, emb) == set(A)  # readers never need the lock
    finally:
        holder.communicate("\n", timeout=30)
    index_documents(docs(B), index, embedder=emb)  # released when the holder exits


def test_lock_in_the_same_process_also_excludes(index, emb):
    with writer_lock(index):
        with pytest.raises(IndexStoreError, match="another process"):
            index_documents(docs(B), index, embedder=emb)


def test_queries_while_reindexing_see_whole_generations(index, emb):
    sets = [frozenset(A), frozenset(B)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer():
        try:
            for i in range(8):
                index_documents(docs(B if i % 2 == 0 else A), index, embedder=emb)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            stop.set()

    t = threading.Thread(target=writer)
    t.start()
    reads = 0
    while not stop.is_set() or reads < 3:
        with Retriever.open(index, embedder=emb) as r:
            ids = frozenset(d.doc_id for d in r.documents())
            assert ids in sets
            hits = r.search("apples", k=3, mode="hybrid")
            assert hits and {h.doc_id for h in hits} <= ids
            assert hits[0].doc_id == "a"
        reads += 1
    t.join()
    assert not errors, errors
    assert reads >= 3
