"""``ask/eval --samples N --select majority|verifier|majority+verifier --verifier DIR`` and ``train verifier``
through the CLI entry point: scripted policies (PAL programs run in the real sandbox), a verifier trained in
seconds on the real embedded MiniLM (e2e), and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragloop.cli import main
from ragloop.core.trace import read_traces

# per question, 3 sampled programs: q1 -> 2 (right), 3, 2 (right); q2 -> 5, 4 (right), 6: majority's tie -> 5 (wrong)
PROGRAMS = ["\n    return 2", "\n    return 3", "\n    return 2", "\n    return 5", "\n    return 4", "\n    return 6"]


def script(tmp_path: Path, responses: list[str], name: str = "s.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(responses))
    return f"scripted:{p}"


def gsm8k_file(tmp_path: Path) -> str:
    data = tmp_path / "g.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "#### 4"}\n')
    return str(data)


@pytest.mark.parametrize(
    "args, message",
    [(["--samples", "4", "--select", "verifier"], "--select verifier needs a verifier"),
     (["--samples", "4", "--select", "majority+verifier"], "--select majority+verifier needs a verifier"),
     (["--samples", "4", "--select", "best"], "unknown selection 'best'"),
     (["--select", "verifier", "--verifier", "x"], "--select verifier chooses among sampled runs"),
     (["--samples", "4", "--verifier", "x"], "--verifier is used only by --select verifier"),
     (["--samples", "2", "--select", "verifier", "--verifier", "{tmp}"], "is not a reward model directory")],
)
@pytest.mark.parametrize("command", ["ask", "eval"])
def test_selection_errors_are_one_line(tmp_path, capsys, ragloop_home, command, args, message):
    base = (["ask", "What is 1+1?", "--agent", "pal"] if command == "ask"
            else ["eval", "gsm8k", "--agent", "pal", "--data", gsm8k_file(tmp_path)])
    rc = main([*base, *[a.replace("{tmp}", str(tmp_path)) for a in args], "--policy", script(tmp_path, ["x"])])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err
    assert err.startswith("error: ") and "hint:" in err


def test_eval_temperature_without_samples_is_refused(tmp_path, capsys, ragloop_home):
    rc = main(["eval", "gsm8k", "--agent", "pal", "--data", gsm8k_file(tmp_path), "--temperature", "0.5",
               "--policy", script(tmp_path, ["x"])])
    err = capsys.readouterr().err
    assert rc == 2 and "--temperature sets the sampling of --samples runs" in err


def test_eval_samples_majority_reports_the_selection_and_keeps_every_sample(tmp_path, capsys, ragloop_home):
    out = tmp_path / "run.jsonl"
    rc = main(["eval", "gsm8k", "--agent", "pal", "--data", gsm8k_file(tmp_path), "--samples", "3", "--shots", "1",
               "--seed", "5", "--out", str(out), "--json", "--policy", script(tmp_path, PROGRAMS)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads(cap.out.strip().splitlines()[-1])
    assert d["n"] == 2 and d["correct"] == 1  # q2's three-way tie goes to the first run (5, wrong)
    sel = d["selection"]
    assert sel["method"] == "majority" and sel["samples"] == 3 and sel["temperature"] == 0.7
    assert sel["sample_accuracy"] == 0.5 and sel["pass_at_n"] == 1.0  # 3 of 6 runs right; each question has one
    assert sel["by_method"] == {"majority": {"correct": 1, "n": 2, "accuracy": 0.5, "ci95": d["ci95"]}}
    assert "selection majority of 3 samples" in cap.out and "pass@3 1.000" in cap.out
    chosen = read_traces(out)
    assert [t.answer for t in chosen] == ["2", "5"]
    assert chosen[1].meta["selection"]["tie"] == ["5", "4", "6"] and chosen[1].meta["selection"]["correct_samples"] == 1
    runs = read_traces(tmp_path / "run.samples.jsonl")  # every run, judged, in question x sample order
    assert [(t.answer, t.feedback.correct, t.meta["sample"], t.seed) for t in runs] == [
        ("2", True, 0, 5), ("3", False, 1, 6), ("2", True, 2, 7), ("5", False, 0, 5), ("4", True, 1, 6),
        ("6", False, 2, 7)]
    assert all(t.decoding["temperature"] == 0.7 for t in runs)


def test_ask_samples_records_the_selection(tmp_path, capsys, ragloop_home):
    rc = main(["ask", "A pen costs $2. How much do 6 pens cost?", "--agent", "pal", "--samples", "3", "--json",
               "--no-log", "--policy", script(tmp_path, ["\n    return 11\n", "\n    return 12\n", "\n    return 6 * 2\n"])])
    cap = capsys.readouterr()
    assert rc == 0
    trace = json.loads(cap.out)
    assert trace["answer"] == "12" and trace["meta"]["selection"]["index"] == 1
    assert trace["meta"]["selection"]["votes"] == {"11": 1, "12": 2} and trace["meta"]["samples"]["votes"] == {"11": 1, "12": 2}
    # without --json the chosen answer is printed on stdout (the runs and votes go to stderr)
    rc = main(["ask", "A pen costs $2. How much do 6 pens cost?", "--agent", "pal", "--samples", "3", "--no-log",
               "--policy", script(tmp_path, ["\n    return 11\n", "\n    return 12\n", "\n    return 6 * 2\n"])])
    cap = capsys.readouterr()
    assert rc == 0 and "Answer: 12  (run 2 of 3, by majority)" in cap.out and "votes over 3 runs: 12: 2, 11: 1" in cap.err


def test_train_verifier_needs_judged_runs_of_both_outcomes(tmp_path, capsys, ragloop_home):
    from ragloop.core.trace import Trace, write_traces

    path = tmp_path / "t.jsonl"
    write_traces(path, [Trace(agent="pal", question="q", answer="1")])
    rc = main(["train", "verifier", "--traces", str(path), "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert rc == 4 and "too few verifier pairs (no trace is judged" in err and "--samples 8" in err


@pytest.mark.e2e
def test_train_verifier_then_select_with_it(tmp_path, capsys, ragloop_home):
    """eval --samples writes judged runs -> train verifier (MiniLM, head only) -> eval/ask --select with it:
    the recorded scores are the verifier's own scores of each run, and the chosen run follows from them."""
    from ragloop.alignment.data import trace_prompt_text, trace_response_text
    from ragloop.alignment.reward import load_reward_model
    from ragloop.eval.select import select_answer

    data = gsm8k_file(tmp_path)
    rc = main(["eval", "gsm8k", "--agent", "pal", "--data", data, "--samples", "3", "--shots", "1", "--quiet",
               "--out", str(tmp_path / "s.jsonl"), "--policy", script(tmp_path, PROGRAMS)])
    assert rc == 0
    rc = main(["train", "verifier", "--traces", str(tmp_path / "s.samples.jsonl"), "--out", str(tmp_path / "ver"),
               "--freeze-backbone", "--max-length", "128"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "6 traces, 6 judged (3 correct), 2 questions -> 3 pairs" in cap.err and "verifier:" in cap.out
    rm = load_reward_model(tmp_path / "ver")

    out = tmp_path / "v.jsonl"
    rc = main(["eval", "gsm8k", "--agent", "pal", "--data", data, "--samples", "3", "--shots", "1", "--quiet",
               "--select", "majority+verifier", "--verifier", str(tmp_path / "ver"), "--out", str(out), "--json",
               "--policy", script(tmp_path, PROGRAMS)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads(cap.out.strip().splitlines()[-1])
    assert set(d["selection"]["by_method"]) == {"majority", "verifier", "majority+verifier"}
    assert d["selection"]["by_method"]["majority"]["correct"] == 1
    runs = read_traces(tmp_path / "v.samples.jsonl")
    for q, chosen in enumerate(read_traces(out)):
        group = runs[3 * q: 3 * q + 3]
        want = rm.score_batch([trace_prompt_text(t) for t in group], [trace_response_text(t) for t in group])
        rec = chosen.meta["selection"]
        assert rec["method"] == "majority+verifier" and rec["scores"] == pytest.approx(want, abs=1e-4)
        expect = select_answer([t.answer for t in group], "majority+verifier", task="gsm8k", scores=want)
        assert rec["index"] == expect.index and chosen.answer == group[expect.index].answer
    assert d["correct"] == sum(bool(t.feedback.correct) for t in read_traces(out))

    rc = main(["ask", "2+2?", "--agent", "pal", "--shots", "1", "--samples", "3", "--select", "verifier", "--json",
               "--no-log", "--verifier", str(tmp_path / "ver"), "--policy", script(tmp_path, PROGRAMS[3:])])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rec = json.loads(cap.out)["meta"]["selection"]
    assert rec["method"] == "verifier" and rec["index"] == max(range(3), key=lambda i: (rec["scores"][i], -i))


def test_eval_claims_samples_vote_by_label(tmp_path, capsys, ragloop_home):
    """Claim labels vote as the runner judges them ("Supported." and "SUPPORTS" are one label)."""
    from ragloop.retrieval import HashingEmbedder, index_documents
    from ragloop.retrieval.loaders import documents_from_records

    idx = tmp_path / "idx"
    index_documents(documents_from_records([{"_id": "1", "title": "Aspirin", "text": "Aspirin relieves headaches."}]),
                    str(idx), embedder=HashingEmbedder(64))
    data = tmp_path / "c.csv"
    data.write_text("id,claim,evidence_label\n1,Aspirin relieves headaches.,SUPPORT\n")
    responses = [" s\nAction 1: Search[aspirin]", " ok\nAction 2: Finish[REFUTES]",
                 " s\nAction 1: Search[aspirin]", " ok\nAction 2: Finish[Supported.]",
                 " s\nAction 1: Search[aspirin]", " ok\nAction 2: Finish[SUPPORTS]"]
    rc = main(["eval", "claims", "--index", str(idx), "--data", str(data), "--json", "--quiet", "--samples", "3",
               "--fallback", "none", "--out", str(tmp_path / "t.jsonl"), "--policy", script(tmp_path, responses)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads(cap.out.strip().splitlines()[-1])
    assert d["accuracy"] == 1.0 and d["selection"]["sample_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    chosen = read_traces(tmp_path / "t.jsonl")[0]
    assert chosen.meta["selection"]["votes"] == {"REFUTES": 1, "SUPPORTS": 2} and chosen.meta["selection"]["index"] == 1
