"""``ragloop ask`` logs every exchange; ``ragloop logs`` shows them and exports Traces that ``train`` reads."""

from __future__ import annotations

import json
from pathlib import Path

from ragloop.cli import main
from ragloop.core.trace import read_traces


def script(tmp_path: Path, responses: list[str]) -> str:
    p = tmp_path / "s.json"
    p.write_text(json.dumps(responses))
    return f"scripted:{p}"


def _index(tmp_path: Path) -> str:
    from ragloop.retrieval import HashingEmbedder, build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "server.md").write_text("# Server\n\nThe admin server listens on port 8443 by default.\n")
    (docs / "mascot.txt").write_text("The mascot of the project is a bluefin tuna.\n")
    build_index([str(docs)], str(tmp_path / "idx"), embedder=HashingEmbedder(64))
    return str(tmp_path / "idx")


def test_ask_with_index_defaults_to_rag_prints_sources_and_logs(tmp_path, capsys, ragloop_home):
    idx = _index(tmp_path)
    rc = main(["ask", "Which port does the admin server listen on?", "--index", idx,
               "--policy", script(tmp_path, ["It listens on port 8443 [1]."])])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Answer: It listens on port 8443 [1]." in out
    assert "Sources:" in out and "server.md" in out and "cited" in out
    assert (ragloop_home / "logs.db").is_file()

    rc = main(["ask", "What is 6 * 7?", "--agent", "pal", "--no-log", "--quiet",
               "--policy", script(tmp_path, ["\n    return 6 * 7\n"])])
    assert rc == 0 and capsys.readouterr().out.strip() == "42"
    rc = main(["ask", "What is 3 * 3?", "--agent", "pal", "--quiet", "--policy", script(tmp_path, ["\n    return 9\n"])])
    assert rc == 0
    capsys.readouterr()

    assert main(["logs", "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert "Q: Which port does the admin server listen on?" in out and "A: It listens on port 8443 [1]." in out
    assert "Q: What is 3 * 3?" in out and "6 * 7" not in out  # --no-log kept it out
    assert "ask · rag · index" in out and "sources: 2 passages" in out

    assert main(["logs", "-n", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["agent"] == "pal" and rows[0]["answer"] == "9"

    out_file = tmp_path / "logged.jsonl"
    assert main(["logs", "-n", "0", "--traces", str(out_file)]) == 0
    traces = read_traces(out_file)
    assert [t.agent for t in traces] == ["rag", "pal"]
    assert traces[0].sources and traces[0].sources[0].cited
    # the exported traces are what `train sft --traces FILE --all-traces` reads: they become SFT rows
    # (logged answers are unjudged, so the default filter, which keeps correct traces only, would drop them)
    from ragloop.alignment.data import traces_to_sft_rows

    rows, report = traces_to_sft_rows(traces)
    assert len(rows) == 2 and report.kept == 2
    assert rows[0].messages[-1].role == "assistant" and "8443" in rows[0].messages[-1].content


def test_logs_errors_are_one_line(tmp_path, capsys, ragloop_home):
    assert main(["logs"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: no log yet at") and "Traceback" not in err
    (ragloop_home / "logs.db").write_text("not sqlite at all, just text " * 20)
    assert main(["logs"]) != 0
    assert "not a readable SQLite file" in capsys.readouterr().err
    assert main(["logs", "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(ragloop_home / "logs.db")
