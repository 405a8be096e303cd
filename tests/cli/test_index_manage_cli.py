"""``ragloop index --list | --docs | --remove | --delete`` on real indexes (hashing embedder, real FAISS/SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragloop.cli import main
from ragloop.retrieval import Retriever
from ragloop.retrieval.manage import delete_index, is_index_dir, match_documents


def _docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.md").write_text("# Alpha\n\nAlpha particles are helium nuclei.\n")
    (d / "b.txt").write_text("Beta decay emits an electron.\n")
    (d / "sub" / "c.txt").write_text("Gamma rays are photons.\n")
    return d


def test_list_docs_remove_delete(tmp_path, capsys, ragloop_home):
    d = _docs(tmp_path)
    assert main(["index", str(d), "--index", "phys", "--embedder", "hashing", "--quiet"]) == 0
    assert main(["index", str(d / "a.md"), "--index", "other", "--embedder", "hashing", "--quiet"]) == 0
    capsys.readouterr()

    assert main(["index", "--list"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("other") and lines[1].startswith("phys")
    assert "3 docs" in lines[1] and "MB" in lines[1] and "hashing" in lines[1]
    assert main(["index", "--list", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in infos] == ["other", "phys"] and infos[1]["documents"] == 3

    assert main(["index", "--index", "phys", "--docs"]) == 0
    out = capsys.readouterr().out
    assert "a.md" in out and "sub/c.txt" in out and "3 documents" in out and "chunks" in out

    # remove a file and a directory; the index stays searchable, with the rest
    assert main(["index", "--index", "phys", "--remove", str(d / "sub")]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "c.txt" in out and "2 documents" in out
    with Retriever.open("phys") as r:
        assert r.num_documents == 2 and r.generation == "gen-000002"
        assert all("Gamma" not in h.text for h in r.search("gamma photons", k=5, mode="bm25"))

    # errors: unknown document, removing everything, delete without a terminal or --yes
    assert main(["index", "--index", "phys", "--remove", str(d / "nope.md")]) == 2
    assert "no document in" in capsys.readouterr().err
    assert main(["index", "--index", "phys", "--remove", str(d)]) == 2
    assert "--delete" in capsys.readouterr().err
    assert main(["index", "--index", "phys", "--delete"]) == 2
    assert "without confirmation" in capsys.readouterr().err
    assert (ragloop_home / "indexes" / "phys").is_dir()

    assert main(["index", "--index", "phys", "--delete", "--yes"]) == 0
    assert not (ragloop_home / "indexes" / "phys").exists()
    capsys.readouterr()
    assert main(["index", "--list"]) == 0
    assert "phys" not in capsys.readouterr().out
    assert main(["index", "--list", "--docs"]) == 2


def test_delete_refuses_a_folder_that_is_not_an_index(tmp_path):
    d = _docs(tmp_path)
    assert not is_index_dir(d)
    with pytest.raises(Exception, match="does not look like a ragloop index"):
        delete_index(str(d))
    assert (d / "a.md").is_file()


def test_match_documents():
    known = ["/d/a.md", "/d/sub/b.md", "rec-1"]
    assert match_documents(known, "/d/sub") == ["/d/sub/b.md"]
    assert match_documents(known, "rec-1") == ["rec-1"]
    assert match_documents(known, "/d/sub/") == ["/d/sub/b.md"]
    assert match_documents(known, "/x") == []
