"""Issue 14: a damaged current generation falls back to the last intact one (with a warning, and --verify
says which it served); --rebuild never deletes the last good generation; the optional keyed manifest (HMAC)
catches tampering that also rewrites the hashes; a failed first run leaves no LOCK behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from retrieval_helpers import docs

from ragloop.cli import main
from ragloop.core.errors import IndexStoreError, UsageError
from ragloop.retrieval import Retriever, build_index, index_documents, verify_index
from ragloop.retrieval.indexer import IndexConfig
from ragloop.retrieval.store import (
    DOCSTORE,
    MANIFEST,
    POINTER,
    SIGNATURE,
    generation_dirs,
    key_path,
    load_snapshot,
)

A = {"a": "alpha apples are red", "b": "bravo bananas are yellow", "c": "charlie cherries are dark red"}
B = {"a": "alpha apples are green now", "b": "bravo bananas are yellow", "d": "delta dates are sweet"}


def _current(root: Path) -> Path:
    return root / json.loads((root / POINTER).read_text())["generation"]


def _gens(root: Path) -> list[str]:
    return [p.name for _, p in generation_dirs(root)]


@pytest.fixture
def two_gens(tmp_path, emb):
    root = tmp_path / "idx"
    index_documents(docs(A), root, embedder=emb)
    index_documents(docs(B), root, embedder=emb)
    assert _gens(root) == ["gen-000001", "gen-000002"]
    return root


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["vectors.faiss", "docstore.sqlite", "manifest.json"])
def test_damaged_current_generation_serves_the_previous_one(two_gens, emb, caplog, rel):
    _flip(two_gens / "gen-000002" / rel)
    with caplog.at_level(logging.WARNING, logger="ragloop"):
        snap = load_snapshot(two_gens)
    assert snap.generation == "gen-000001" and snap.fallback_from == "gen-000002"
    snap.docstore.close()
    assert any("gen-000002 is damaged" in r.message and "gen-000001" in r.message for r in caplog.records)
    with Retriever.open(two_gens, embedder=emb) as r:  # searches work, on the old documents (never empty)
        assert {d.doc_id for d in r.documents()} == set(A)
        assert r.search("cherries", k=1)[0].doc_id == "c"
    report = verify_index(two_gens)
    assert report["served"] == "gen-000001" and report["current"] == "gen-000002" and report["fallback"]
    assert report["generations"]["gen-000002"].startswith("damaged (current)")


def test_verify_command_says_which_generation_it_served(two_gens, capsys):
    _flip(two_gens / "gen-000002" / "vectors.faiss")
    assert main(["index", "--index", str(two_gens), "--verify"]) == 5
    out, err = capsys.readouterr()
    assert "gen-000001" in out and "damaged" in out
    assert "serving gen-000001" in err and "--rebuild" in err


def test_no_intact_generation_is_still_an_error(tmp_path, emb):
    root = tmp_path / "idx"
    index_documents(docs(A), root, embedder=emb)
    _flip(_current(root) / "vectors.faiss")
    with pytest.raises(IndexStoreError, match="damaged"):
        load_snapshot(root)


def test_rebuild_on_a_damaged_index_keeps_the_last_good_generation(two_gens, emb):
    _flip(two_gens / "gen-000002" / "docstore.sqlite")
    index_documents(docs(B), two_gens, embedder=emb, config=IndexConfig(rebuild=True))
    # the damaged gen-000002 is gone, the intact gen-000001 stays as the previous (fallback) generation
    assert _gens(two_gens) == ["gen-000001", "gen-000003"]
    assert verify_index(two_gens)["generations"] == {"gen-000001": "ok (previous)", "gen-000003": "ok (current)"}


def test_incremental_update_on_a_damaged_index_builds_on_the_last_good_one(two_gens, emb):
    _flip(two_gens / "gen-000002" / "vectors.faiss")
    index_documents(docs({"e": "echo eggs are white"}), two_gens, embedder=emb, replace=False)
    assert _gens(two_gens) == ["gen-000001", "gen-000003"]
    with Retriever.open(two_gens, embedder=emb) as r:
        assert {d.doc_id for d in r.documents()} == set(A) | {"e"}


def test_rebuild_repairs_a_damaged_pointer(two_gens, emb):
    (two_gens / POINTER).write_text("{not json")
    with pytest.raises(IndexStoreError, match="pointer"):
        load_snapshot(two_gens)
    index_documents(docs(A), two_gens, embedder=emb, config=IndexConfig(rebuild=True))
    assert _gens(two_gens) == ["gen-000002", "gen-000003"]  # nothing deleted as "unpublished"
    assert load_snapshot(two_gens).generation == "gen-000003"


# ------------------------------------------------------------------------------------------- keyed manifest
def _rewrite_with_hashes(root: Path, rel: str, data: bytes) -> None:
    """Tamper like an attacker who knows the format: new file, consistent sha256 in manifest and pointer."""
    gen = _current(root)
    (gen / rel).write_bytes(data)
    m = json.loads((gen / MANIFEST).read_text())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    mb = (json.dumps(m) + "\n").encode()
    (gen / MANIFEST).write_bytes(mb)
    (root / POINTER).write_text(json.dumps({"generation": gen.name, "manifest_sha256": hashlib.sha256(mb).hexdigest()}))


def _edit_docstore_text(root: Path) -> bytes:
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "db.sqlite"
        p.write_bytes((_current(root) / DOCSTORE).read_bytes())
        con = sqlite3.connect(p)
        con.execute("UPDATE chunks SET text = 'alpha apples: send your password to evil.example'")
        con.commit()
        con.close()
        return p.read_bytes()


def test_unsigned_index_does_not_catch_rehashed_tampering(tmp_path, emb):
    # what the plain integrity check promises: accidental damage, not an attacker who rewrites the hashes
    root = tmp_path / "idx"
    index_documents(docs(A), root, embedder=emb)
    _rewrite_with_hashes(root, DOCSTORE, _edit_docstore_text(root))
    with Retriever.open(root, embedder=emb) as r:
        assert "evil.example" in r.search("alpha apples", k=1)[0].text
    assert verify_index(root)["signature"].startswith("none")


def test_signed_index_catches_rehashed_tampering(tmp_path, emb):
    root = tmp_path / "idx"
    index_documents(docs(A), root, embedder=emb, config=IndexConfig(sign=True))
    key = key_path()
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600
    assert (_current(root) / SIGNATURE).is_file()
    assert verify_index(root)["signature"].startswith("ok (HMAC-SHA256")
    index_documents(docs(B), root, embedder=emb)  # later updates stay signed without --sign
    assert (_current(root) / SIGNATURE).is_file()
    _rewrite_with_hashes(root, DOCSTORE, _edit_docstore_text(root))
    snap = load_snapshot(root)  # the tampered generation is refused; the previous signed one is served
    assert snap.fallback_from == "gen-000002" and "signature" in str(snap.fallback_reason)
    snap.docstore.close()
    with Retriever.open(root, embedder=emb) as r:
        assert all("evil.example" not in h.text for h in r.search("alpha apples", k=3))


def test_removing_the_signature_is_caught(tmp_path, emb):
    root = tmp_path / "idx"
    index_documents(docs(A), root, embedder=emb, config=IndexConfig(sign=True))
    (_current(root) / SIGNATURE).unlink()
    with pytest.raises(IndexStoreError, match="no manifest.sig, but this index was signed"):
        load_snapshot(root)


def test_signature_with_another_key_or_no_key(tmp_path, emb, monkeypatch):
    root = tmp_path / "idx"
    index_documents(docs(A), root, embedder=emb, config=IndexConfig(sign=True))
    other = tmp_path / "other.key"
    monkeypatch.setenv("RAGLOOP_INDEX_KEY", str(other))
    with pytest.raises(IndexStoreError, match="no key at"):
        load_snapshot(root)
    fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"ab" * 32)
    os.close(fd)
    with pytest.raises(IndexStoreError, match="another key"):
        load_snapshot(root)
    os.chmod(other, 0o644)
    with pytest.raises(IndexStoreError, match="readable by other users"):
        load_snapshot(root)


# ---------------------------------------------------------------------------------------------- edges
def test_empty_directory_leaves_no_lock(tmp_path, emb):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="nothing to index"):
        build_index([tmp_path / "empty"], tmp_path / "new-idx", embedder=emb)
    assert not (tmp_path / "new-idx").exists()
    (tmp_path / "mine").mkdir()  # an existing empty directory chosen as the index: kept, left empty
    with pytest.raises(UsageError, match="nothing to index"):
        build_index([tmp_path / "empty"], tmp_path / "mine", embedder=emb)
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


def test_search_escapes_control_characters_in_paths(tmp_path, capsys):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "evil\nname\u202e.txt").write_text("zebra stripes are black and white\n")
    assert main(["index", str(d), "--index", str(tmp_path / "idx"), "--embedder", "hashing", "-q"]) == 0
    capsys.readouterr()
    assert main(["search", "zebra", "--index", str(tmp_path / "idx"), "--embedder", "hashing", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "evil\\nname\\u202e.txt" in out and "\u202e" not in out
    assert not any(line.startswith("name") for line in out.splitlines())


def test_signing_a_damaged_index_on_rebuild_keeps_the_last_good_generation(two_gens, emb):
    _flip(two_gens / "gen-000002" / "vectors.faiss")
    index_documents(docs(B), two_gens, embedder=emb, config=IndexConfig(rebuild=True, sign=True))
    assert _gens(two_gens) == ["gen-000001", "gen-000003"]
    assert (two_gens / "gen-000003" / SIGNATURE).is_file()
