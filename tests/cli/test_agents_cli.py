"""``ragloop ask | eval`` through the CLI entry point (scripted policy), plus one subprocess run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragloop.cli import main
from ragloop.core.trace import read_traces


def script(tmp_path: Path, responses: list[str], name: str = "s.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(responses))
    return f"scripted:{p}"


def test_ask_pal_live_view(tmp_path, capsys, ragloop_home):
    rc = main(["ask", "A store sells pens at 3 for $2. How much do 18 pens cost?", "--agent", "pal",
               "--policy", script(tmp_path, ["\n    return 18 / 3 * 2\n"])])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Program:" in out and "def solution():" in out and "Answer: 12" in out


def test_ask_json_is_the_whole_trace_and_save(tmp_path, capsys, ragloop_home):
    save = tmp_path / "t.jsonl"
    rc = main(["ask", "What is 6 * 7?", "--agent", "react", "--json", "--save", str(save),
               "--policy", script(tmp_path, [" mult\nAction 1: Calculator[6 * 7]", " done\nAction 2: Finish[42]"])])
    out = capsys.readouterr().out
    assert rc == 0
    trace = json.loads(out)
    assert trace["answer"] == "42" and trace["agent"] == "react" and trace["finished"]
    assert trace["steps"][0]["observation"] == "Observation 1: <data> 42 </data>"
    assert read_traces(save)[0].answer == "42"


def test_ask_cot_self_consistency_quiet(tmp_path, capsys, ragloop_home):
    rc = main(["ask", "2 + 2?", "--agent", "cot", "--shots", "1", "--self-consistency", "3", "--quiet",
               "--policy", script(tmp_path, ["The answer is 4.", "The answer is 5.", "The answer is 4."])])
    assert rc == 0 and capsys.readouterr().out.strip() == "4"


@pytest.mark.parametrize(
    "args, message",
    [(["ask", "  ", "--agent", "pal"], "the question is empty"),
     (["ask", "q", "--agent", "wizard"], "unknown agent 'wizard'"),
     (["ask", "q", "--agent", "pal", "--index", "x"], "--index is for the react agent"),
     (["ask", "q", "--agent", "rag"], "the rag agent needs an index"),
     (["ask", "q", "--agent", "cot", "--shots", "-1"], "--shots must be >= 0"),
     (["ask", "q", "--agent", "react", "--action-format", "xml"], "--action-format must be text or json"),
     (["ask", "q", "--agent", "react", "--index", "no-such-index"], "no-such-index"),
     (["eval", "gsm8k", "--data", "/nonexistent.jsonl"], "not found"),
     (["eval", "gsm8k", "--agent", "magic"], "unknown agent"),
     (["eval", "claims", "--agent", "pal"], "claims are verified by rag, react or cot"),
     (["eval", "claims", "--corpus", "/nonexistent/corpus.jsonl"], "corpus file not found"),
     (["chat", "--timeout", "0"], "--timeout must be in")],
)
def test_usage_errors_are_one_line(tmp_path, capsys, ragloop_home, args, message):
    rc = main([*args, "--policy", script(tmp_path, ["x"])])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err
    assert err.startswith("error: ")


def test_bad_scripted_policy_file(tmp_path, capsys, ragloop_home):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    rc = main(["ask", "q", "--agent", "pal", "--policy", f"scripted:{bad}"])
    assert rc == 2 and "cannot read the scripted policy file" in capsys.readouterr().err


def test_eval_gsm8k_json_last_line(tmp_path, capsys, ragloop_home):
    data = tmp_path / "g.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "#### 4"}\n')
    out = tmp_path / "traces.jsonl"
    rc = main(["eval", "gsm8k", "--agent", "pal", "--data", str(data), "--limit", "2", "--seed", "3", "--out", str(out),
               "--shots", "2", "--json", "--policy", script(tmp_path, ["\n    return 2", "\n    return 5"])])
    cap = capsys.readouterr()
    assert rc == 0
    lines = cap.out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last["accuracy"] == 0.5 and last["n"] == 2 and len(last["ci95"]) == 2 and last["seed"] == 3
    assert {"format_valid", "tool_success", "seconds_per_question", "slice", "model"} <= set(last)
    assert lines[0].startswith("gsm8k · agent=pal · model=scripted · slice=g.jsonl[0:2] · seed=3")
    assert "accuracy 0.500 (1/2), 95% CI [" in cap.out
    assert "[1/2] ✓" in cap.err and "[2/2] ✗" in cap.err
    assert len(read_traces(out)) == 2


def test_eval_claims_with_a_real_index(tmp_path, capsys, ragloop_home):
    from ragloop.retrieval import HashingEmbedder, index_documents
    from ragloop.retrieval.loaders import documents_from_records

    idx = tmp_path / "idx"
    index_documents(documents_from_records([{"_id": "1", "title": "Aspirin", "text": "Aspirin relieves headaches."},
                                            {"_id": "2", "title": "Moon", "text": "The moon is made of rock."}]),
                    str(idx), embedder=HashingEmbedder(64))
    data = tmp_path / "c.csv"
    data.write_text("id,claim,evidence_label\n1,Aspirin relieves headaches.,SUPPORT\n2,The moon is cheese.,CONTRADICT\n")
    responses = [" search\nAction 1: Search[aspirin]", " ok\nAction 2: Finish[SUPPORTS]",
                 " search\nAction 1: Search[moon]", " rock\nAction 2: Finish[REFUTES]"]
    rc = main(["eval", "claims", "--index", str(idx), "--data", str(data), "--json", "--quiet",
               "--out", str(tmp_path / "t.jsonl"), "--policy", script(tmp_path, responses)])
    out = capsys.readouterr().out
    assert rc == 0
    last = json.loads(out.strip().splitlines()[-1])
    assert last["accuracy"] == 1.0 and last["format_valid"] == 1.0 and last["tool_success"] == 1.0
    traces = read_traces(tmp_path / "t.jsonl")
    assert traces[1].steps[0].retrieved_ids and "moon" in traces[1].steps[0].observation.lower()


def test_subprocess_ask(tmp_path):
    exe = Path(sys.executable).parent / "ragloop"
    r = subprocess.run([str(exe), "ask", "What is 3 * 4?", "--agent", "pal", "--quiet", "--policy",
                        script(tmp_path, ["\n    return 3 * 4\n"])],
                       capture_output=True, text=True, timeout=120, env={"RAGLOOP_HOME": str(tmp_path / "h"),
                                                                          "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "12"


def test_ask_samples_runs_the_agent_n_times_and_votes(tmp_path, capsys, ragloop_home):
    """--samples N: N whole PAL runs (one episode each), the majority answer, votes and ties shown."""
    save = tmp_path / "t.jsonl"
    rc = main(["ask", "A pen costs $2. How much do 6 pens cost?", "--agent", "pal", "--samples", "3", "--save",
               str(save), "--policy", script(tmp_path, ["\n    return 12\n", "\n    return 11\n", "\n    return 6 * 2\n"])])
    captured = capsys.readouterr()
    assert rc == 0
    assert "votes over 3 runs: 12: 2, 11: 1" in captured.err
    trace = read_traces(save)[0]
    assert trace.answer == "12" and trace.meta["samples"]["answers"] == ["12", "11", "12"]
    assert trace.meta["samples"]["tie"] is None and trace.decoding["temperature"] == 0.7
