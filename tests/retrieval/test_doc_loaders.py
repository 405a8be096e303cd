"""Loaders and discovery against every bad input of SECURITY.md §3, and the supported formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from retrieval_helpers import make_pdf

from ragloop.core.errors import DataError, UsageError
from ragloop.retrieval.chunking import _with_offsets
from ragloop.retrieval.loaders import (
    FileProblemError,
    discover_files,
    documents_from_records,
    load_file,
    read_beir_corpus,
)


def _problem(path: Path, **kw):
    with pytest.raises(FileProblemError) as e:
        load_file(path, **kw)
    return e.value.problem


def test_with_offsets_literal():
    assert _with_offsets("ab cd ef", ["ab cd", "cd ef"]) == [("ab cd", 0), ("cd ef", 3)]
    assert _with_offsets("x x x", ["x", "x", "x"]) == [("x", 0), ("x", 2), ("x", 4)]


def test_formats(tmp_path):
    (tmp_path / "a.md").write_text("intro\n\n# Title Here\n\nbody\n")
    d = load_file(tmp_path / "a.md")
    assert d.title == "Title Here" and d.metadata["language"] == "markdown" and d.doc_id == str(tmp_path / "a.md")
    (tmp_path / "b.rst").write_text("My Title\n========\n\ntext\n")
    assert load_file(tmp_path / "b.rst").title == "My Title"
    (tmp_path / "c.html").write_text("<html><head><title>T</title><script>evil()</script></head>"
                                     "<body><p>Hello</p><style>x{}</style><p>world</p></body></html>")
    d = load_file(tmp_path / "c.html")
    assert d.title == "T" and "Hello" in d.text and "world" in d.text and "evil" not in d.text and "x{}" not in d.text
    (tmp_path / "d.json").write_text(json.dumps([{"q": "a", "n": {"x": 1}}, {"q": "b"}]))
    d = load_file(tmp_path / "d.json")
    assert [s.text for s in d.segments] == ["q: a\nn.x: 1", "q: b"] and d.segments[1].metadata == {"record": 1}
    (tmp_path / "e.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [(s.text, s.metadata["line"]) for s in load_file(tmp_path / "e.jsonl").segments] == [
        ("text: one", 1), ("text: two", 3)]
    (tmp_path / "f.csv").write_text("name,desc\nfaiss,vector search\nbm25,\n")
    segs = load_file(tmp_path / "f.csv").segments
    assert segs[0].text == "name: faiss\ndesc: vector search" and segs[0].metadata["line"] == 2
    (tmp_path / "g.py").write_text("def f():\n    return 1\n")
    assert load_file(tmp_path / "g.py").metadata["language"] == "python"
    (tmp_path / "h.pdf").write_bytes(make_pdf(["First page text", "Second page text"]))
    d = load_file(tmp_path / "h.pdf")
    assert [(s.text, s.metadata["page"]) for s in d.segments] == [("First page text", 1), ("Second page text", 2)]
    (tmp_path / "README").write_text("no suffix is text")
    assert load_file(tmp_path / "README").text == "no suffix is text"
    (tmp_path / "u16.txt").write_bytes("utf-16 with BOM ✓".encode("utf-16"))
    assert load_file(tmp_path / "u16.txt").text == "utf-16 with BOM ✓"


@pytest.mark.parametrize(
    "name,data,kind,reason",
    [
        ("bin.txt", b"abc\x00def", "skipped", "binary"),
        ("latin1.txt", "café".encode("latin-1"), "error", "bad encoding"),
        ("empty.txt", b"", "skipped", "empty"),
        ("blank.md", b"  \n\n ", "skipped", "empty"),
        ("img.png", b"\x89PNG", "skipped", "unsupported type"),
        ("bad.json", b'{"a": ', "error", "parse error"),
        ("bad.jsonl", b'{"a": 1}\n{oops}\n', "error", "parse error"),
        ("fake.pdf", b"not a pdf", "error", "parse error"),
        ("broken.pdf", b"%PDF-1.4\n1 0 obj garbage", "error", "parse error"),
        ("image_only.pdf", None, "skipped", "empty"),
    ],
)
def test_bad_files(tmp_path, name, data, kind, reason):
    p = tmp_path / name
    p.write_bytes(make_pdf([""]) if data is None else data)
    problem = _problem(p)
    assert (problem.kind, problem.reason) == (kind, reason)
    assert problem.path == str(p)


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n{oops}\n')
    assert "line 2" in _problem(tmp_path / "x.jsonl").detail


def test_size_cap(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 2000)
    problem = _problem(tmp_path / "big.txt", max_bytes=1000)
    assert problem.reason == "too large" and "2000" in problem.detail


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "secret.txt"
    p.write_text("hidden")
    real_open = os.open

    def fake_open(path, flags, *a):
        if str(path) == str(p):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", fake_open)
    problem = _problem(p)
    assert (problem.kind, problem.reason, problem.detail) == ("error", "unreadable", "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_for_real(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("hidden")
    p.chmod(0)
    assert _problem(p).reason == "unreadable"


def test_discovery_skips_what_it_must(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.md").write_text("b")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("x")
    (root / "empty_dir").mkdir()
    os.mkfifo(root / "pipe.txt")
    os.symlink(root, root / "sub" / "loop")  # a cycle back to the root
    os.symlink(root / "a.txt", root / "link.txt")
    os.symlink(root / "nowhere", root / "dangling.txt")
    os.symlink("selfloop", root / "selfloop")
    files, problems = discover_files([root])
    assert files == [root / "a.txt", root / "sub" / "b.md"]
    reasons = {Path(p.path).name: p.reason for p in problems}
    assert reasons == {".git": "hidden", "pipe.txt": "not a regular file", "loop": "symlink", "link.txt": "symlink",
                       "dangling.txt": "symlink", "selfloop": "symlink"}

    files, problems = discover_files([root], follow_symlinks=True, include_hidden=True)
    reasons = {Path(p.path).name: p.reason for p in problems}
    assert reasons["loop"] == "symlink loop"
    assert reasons["selfloop"] == "symlink loop"
    assert reasons["dangling.txt"] == "broken symlink"
    assert reasons["pipe.txt"] == "not a regular file"
    assert root / ".git" / "config" in files
    assert root / "link.txt" not in files or root / "a.txt" not in files  # the same file once


def test_device_files_are_skipped_when_followed(tmp_path):
    os.symlink("/dev/null", tmp_path / "null.txt")
    _, problems = discover_files([tmp_path], follow_symlinks=True)
    assert [(Path(p.path).name, p.reason, p.detail) for p in problems] == [
        ("null.txt", "not a regular file", "character device")]
    # A FIFO named explicitly is reported, never opened (opening would block forever).
    os.mkfifo(tmp_path / "p")
    files, problems = discover_files([tmp_path / "p"])
    assert files == [] and problems[0].reason == "not a regular file"
    with pytest.raises(FileProblemError, match="not a regular file"):
        load_file(tmp_path / "p")


def test_nonexistent_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="path not found"):
        discover_files([tmp_path, tmp_path / "missing"])


def test_odd_filenames(tmp_path):
    odd = os.fsencode(tmp_path) + b"/caf\xe9 \n\x1b[2J.txt"
    with open(odd, "wb") as f:
        f.write(b"odd name, fine content")
    files, problems = discover_files([tmp_path])
    assert len(files) == 1 and not problems
    d = load_file(files[0])
    assert d.doc_id.endswith("caf\\xe9 \n\x1b[2J.txt")  # printable escape for the undecodable byte
    d.doc_id.encode("utf-8")  # storable


def test_records_and_beir_corpus(tmp_path):
    docs = list(documents_from_records([{"_id": 7, "title": "T", "text": "body", "extra": 1}]))
    assert docs[0].doc_id == "7" and docs[0].text == "T\n\nbody" and docs[0].metadata == {"extra": 1}
    with pytest.raises(DataError, match="lacks"):
        list(documents_from_records([{"title": "no id"}]))
    p = tmp_path / "corpus.jsonl"
    p.write_text('{"_id": "1", "title": "", "text": "a"}\n{"_id": "2", "title": "B", "text": "b"}\n')
    assert [d.text for d in read_beir_corpus(p)] == ["a", "B\n\nb"]
    p.write_text('{"_id": "1", "text": "a"}\nnot json\n')
    with pytest.raises(DataError, match=":2:"):
        read_beir_corpus(p)
