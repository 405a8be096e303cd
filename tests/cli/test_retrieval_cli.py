"""`ragloop index` and `ragloop search`: output, JSON shapes, exit codes (0 / 7 partial / 2 usage / 5 index)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragloop.cli import main

RAGLOOP = str(Path(sys.executable).with_name("ragloop"))
DOCS = {
    "sampling.md": "# Sampling\n\nNucleus sampling keeps the smallest set of tokens whose probability exceeds p.\n",
    "faiss.txt": "FAISS performs similarity search over dense vectors.\n",
    "sub/ppo.md": "# PPO\n\nProximal policy optimisation clips the probability ratio to keep updates small.\n",
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "docs"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_index_search_stats_verify(corpus, ragloop_home, capsys):
    assert main(["index", str(corpus), "--index", "mydocs", "--embedder", "hashing", "-q"]) == 0
    out = capsys.readouterr().out
    assert "indexed 3 documents" in out and str(ragloop_home / "indexes" / "mydocs") in out
    assert main(["index", str(corpus), "--index", "mydocs"]) == 0  # the index's own embedder
    assert "up to date: 3 documents" in capsys.readouterr().out

    assert main(["search", "nucleus sampling", "--index", "mydocs", "-k", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    hits = [json.loads(x) for x in lines]
    assert len(hits) == 2 and {"rank", "score", "chunk_id", "source", "text", "doc_id", "metadata"} <= set(hits[0])
    assert hits[0]["rank"] == 1 and hits[0]["source"].endswith("sampling.md")

    assert main(["search", "policy ratio", "-i", "mydocs", "--mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. [") and "ppo.md (lines 1-3)" in out and "    Proximal policy" in out
    assert main(["search", "zzzz", "-i", "mydocs", "--mode", "bm25"]) == 0
    assert capsys.readouterr().out.strip() == "no results"

    assert main(["index", "--index", "mydocs", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "documents   3" in out and "embedder    hashing-256" in out and "dimension   256" in out
    assert "generations gen-000001 (current)" in out
    assert main(["index", "--index", "mydocs", "--stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"] == 3
    assert main(["index", "--index", "mydocs", "--verify"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_partial_failure_exit_code_and_summary(corpus, tmp_path, capsys):
    (corpus / "bad.txt").write_bytes(b"caf\xe9")
    (corpus / "blob.txt").write_bytes(b"\x00" * 10)
    idx = str(tmp_path / "idx")
    assert main(["index", str(corpus), "--index", idx, "--embedder", "hashing"]) == 7
    cap = capsys.readouterr()
    assert "skipped 1: binary 1" in cap.out and "errors 1" in cap.err and "bad.txt: bad encoding" in cap.err
    assert main(["index", str(corpus), "--index", idx, "--json"]) == 7
    summary = json.loads(capsys.readouterr().out)
    assert summary["errors"][0]["reason"] == "bad encoding" and summary["skipped"]["binary"]


def test_terminal_escapes_in_file_names_are_neutralised(tmp_path, capsys):
    root = tmp_path / "d"
    root.mkdir()
    (root / "evil\x1b[2J.txt").write_bytes(b"\x00binary")
    (root / "ok.txt").write_text("fine")
    assert main(["index", str(root), "--index", str(tmp_path / "i"), "--embedder", "hashing"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "evil\\x1b[2J.txt" in out


@pytest.mark.parametrize("argv,msg", [
    (["index", "--index", "x"], "give files or directories"),
    (["index", "/definitely/not/here", "--index", "x"], "path not found"),
    (["index", ".", "--index", "x", "--stats"], "take no paths"),
    (["index", ".", "--index", "x", "--max-file-mb", "0"], "must be positive"),
    (["index", ".", "--index", "x", "--faiss", "annoy"], "unknown FAISS index kind"),
    (["index", ".", "--index", "x", "--chunk-tokens", "4"], "at least 8 tokens"),
    (["search", "q", "--index", "x", "--mode", "fuzzy"], "unknown --mode"),
    (["search", "q", "--index", "x", "-k", "0"], "at least 1"),
    (["index", ".", "--index", "bad name"], "bad index name"),
])
def test_usage_errors_exit_2(argv, msg, ragloop_home, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err


def test_empty_directory_is_an_error_and_keeps_the_index(corpus, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    assert main(["index", str(corpus), "--index", idx, "--embedder", "hashing"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--index", idx]) == 2
    assert "nothing to index" in capsys.readouterr().err
    assert main(["index", "--index", idx, "--verify"]) == 0


def test_index_errors_exit_5(tmp_path, corpus, capsys):
    assert main(["search", "q", "--index", str(tmp_path / "none")]) == 5
    assert "no index at" in capsys.readouterr().err
    idx = tmp_path / "idx"
    assert main(["index", str(corpus), "--index", str(idx), "--embedder", "hashing"]) == 0
    current = json.loads((idx / "CURRENT").read_text())["generation"]
    (idx / current / "vectors.faiss").write_bytes(b"garbage")
    assert main(["index", "--index", str(idx), "--verify"]) == 5
    err = capsys.readouterr().err
    assert "is damaged" in err and "hint: re-create it" in err and "--rebuild" in err
    assert main(["index", str(corpus), "--index", str(idx), "--rebuild", "--embedder", "hashing"]) == 0
    assert main(["index", "--index", str(idx), "--verify"]) == 0
    capsys.readouterr()
    assert main(["index", str(corpus), "--index", str(idx), "--embedder", "hashing:32"]) == 5
    assert "built with embedder 'hashing-256'" in capsys.readouterr().err


def test_help_documents_index_resolution():
    out = subprocess.run([RAGLOOP, "index", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    flat = " ".join(out.stdout.split())
    assert "indexes/mydocs" in flat and "Exit codes" in flat


@pytest.mark.e2e
def test_real_model_through_the_installed_command(corpus, tmp_path):
    idx = str(tmp_path / "idx")
    env_run = dict(capture_output=True, text=True, timeout=300)
    r = subprocess.run([RAGLOOP, "index", str(corpus), "--index", idx], **env_run)
    assert r.returncode == 0, r.stderr
    assert "3 chunks embedded with sentence-transformers/all-MiniLM-L6-v2" in r.stdout
    r = subprocess.run([RAGLOOP, "search", "an RL method that limits update size", "--index", idx, "-k", "1",
                        "--mode", "dense", "--json"], **env_run)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"].endswith("ppo.md")
