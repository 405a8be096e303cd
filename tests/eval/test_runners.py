"""Benchmark runners on tiny data with a scripted policy: loading, scoring, reports, traces on disk."""

from __future__ import annotations

import json

import pytest

from ragloop.agents.docsearch import KeywordBackend
from ragloop.agents.factory import AgentSpec, build_agent
from ragloop.agents.sandbox import Sandbox, SandboxLimits
from ragloop.core.errors import DataError, UsageError
from ragloop.core.trace import read_traces
from ragloop.eval.runners import (
    RunConfig,
    is_correct,
    load_claims,
    load_gsm8k,
    normalize_label,
    run_benchmark,
    run_examples,
    summarize,
    trace_format_valid,
)
from ragloop.models.scripted import ScriptedPolicy


@pytest.fixture
def gsm(tmp_path):
    p = tmp_path / "gsm.jsonl"
    rows = [{"question": "2 + 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
            {"question": "10 - 4?", "answer": "#### 6"},
            {"question": "2 * 2?", "answer": "#### 1,000"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture
def claims(tmp_path):
    p = tmp_path / "claims.csv"
    p.write_text("id,claim,evidence_doc_id,evidence_label,evidence_sentences,cited_doc_ids\n"
                 "1,Aspirin cures headaches.,11,SUPPORT,[0],[11]\n"
                 "1,Aspirin cures headaches.,12,CONTRADICT,[1],[12]\n"
                 "2,The moon is cheese.,,,[],[13]\n"
                 "3,Water is dry.,14,CONTRADICT,[0],[14]\n")
    return p


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_seconds=10))


def test_load_gsm8k_slice_and_gold(gsm):
    ex = load_gsm8k(gsm)
    assert [e.gold for e in ex] == ["5", "6", "1,000"] and ex[0].id == "gsm:1"
    assert [e.question for e in load_gsm8k(gsm, limit=1, offset=1)] == ["10 - 4?"]


@pytest.mark.parametrize("content, match", [('{"question": "q"}\n', "question"), ("not json\n", ":1:"),
                                             ('{"question": "q", "answer": "no gold"}\n', "####"), ("", "no rows")])
def test_load_gsm8k_bad_rows(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_gsm8k(p)


def test_load_gsm8k_bad_slice(gsm):
    with pytest.raises(UsageError, match="limit"):
        load_gsm8k(gsm, limit=0)
    with pytest.raises(UsageError, match="past the end"):
        load_gsm8k(gsm, offset=10)
    with pytest.raises(DataError, match="not found"):
        load_gsm8k(gsm.parent / "missing.jsonl")


def test_load_claims_one_per_id_and_labels(claims):
    ex = load_claims(claims)
    assert [(e.id, e.gold) for e in ex] == [("1", "SUPPORTS"), ("2", "NOT ENOUGH INFO"), ("3", "REFUTES")]


def test_load_claims_bad_columns(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="columns"):
        load_claims(p)


@pytest.mark.parametrize("text, label", [("SUPPORTS", "SUPPORTS"), ("supported.", "SUPPORTS"), ("REFUTES", "REFUTES"),
                                         ("contradicts", "REFUTES"), ("NOT ENOUGH INFO", "NOT ENOUGH INFO"),
                                         ("nei", "NOT ENOUGH INFO"), ("maybe", None), (None, None)])
def test_normalize_label(text, label):
    assert normalize_label(text) == label


def test_is_correct():
    assert is_correct("gsm8k", "18.0", "18") and not is_correct("gsm8k", None, "18")
    assert is_correct("gsm8k", "1000", "1,000") and is_correct("claims", "Supports", "SUPPORTS")


def test_run_benchmark_pal(gsm, tmp_path, sandbox):
    policy = ScriptedPolicy(["\n    return 2 + 3", "\n    return oops", "I cannot"])
    out = tmp_path / "traces.jsonl"
    seen = []
    report = run_benchmark(RunConfig(task="gsm8k", agent="pal", data=str(gsm), out=str(out), seed=7, shots=1),
                           policy, sandbox=sandbox, progress=lambda i, n, t: seen.append((i, n)))
    assert (report.n, report.correct) == (3, 1) and report.accuracy == pytest.approx(1 / 3)
    lo, hi = report.ci95
    assert 0 < lo < 1 / 3 < hi < 1
    # "I cannot" after the prefilled docstring is a syntax error: not a valid program
    assert report.format_valid == pytest.approx(2 / 3)
    assert report.tool_success == pytest.approx(1 / 3) and report.tool_calls == 3
    assert report.slice == "gsm.jsonl[0:3]" and report.seed == 7 and report.model == "scripted"
    assert seen == [(1, 3), (2, 3), (3, 3)]
    traces = read_traces(out)
    assert [t.feedback.correct for t in traces] == [True, False, False]
    assert all(t.seed == 7 and t.decoding["greedy"] for t in traces)
    d = report.to_dict()
    assert set(d) >= {"accuracy", "ci95", "n", "format_valid", "tool_success", "seconds_per_question"}
    assert json.loads(json.dumps(d))["ci95"] == [round(lo, 4), round(hi, 4)]


def test_run_benchmark_cot_and_react_math(gsm, sandbox):
    cot = run_benchmark(RunConfig(task="gsm8k", agent="cot", data=str(gsm), limit=2, shots=2),
                        ScriptedPolicy(["so 5. The answer is 5.", "it is 7"]))
    assert cot.correct == 1 and cot.format_valid == 0.5 and cot.tool_success is None
    react = run_benchmark(
        RunConfig(task="gsm8k", agent="react", data=str(gsm), limit=1, shots=1),
        ScriptedPolicy([" add\nAction 1: Calculator[2 + 3]", " done\nAction 2: Finish[5]"]), sandbox=sandbox)
    assert react.correct == 1 and react.format_valid == 1 and react.tool_success == 1


def test_run_claims_with_react(claims):
    backend = KeywordBackend({"11": "Aspirin reduces headache pain in trials.", "14": "Water is wet."})
    agent = build_agent(ScriptedPolicy(lambda text, cfg: " look\nAction 1: Search[claim]" if "Thought 1:" in text[-12:]
                                       else " ok\nAction 2: Finish[SUPPORTS]"),
                        AgentSpec(kind="react", task="claims", shots=1), search_backend=backend)
    traces, secs = run_examples(agent, load_claims(claims), task="claims")
    rep = summarize(traces, task="claims", agent="react", model="scripted", data="c", slice_="c[0:3]", seed=0,
                    seconds=secs)
    assert rep.correct == 1 and rep.by_gold["SUPPORTS"] == {"n": 1, "correct": 1}
    assert rep.predictions == {"SUPPORTS": 3}
    assert "Claim: Nikolaj Coster-Waldau" in traces[0].messages[0].content  # the paper's FEVER prompt


def test_format_valid_strict_counts_repairs():
    from ragloop.core.trace import Step, ToolCall, Trace

    t = Trace(agent="react", question="q", finished=True,
              steps=[Step(index=1, action=ToolCall(name="Finish", arguments={"answer": "x"}), repairs=["label-case"])])
    assert trace_format_valid(t) and not trace_format_valid(t, strict=True)


def test_claims_rejects_pal(claims):
    with pytest.raises(UsageError, match="PAL"):
        run_benchmark(RunConfig(task="claims", agent="pal", data=str(claims)), ScriptedPolicy([]))


@pytest.mark.e2e
def test_ensure_scifact_index_builds_once_from_a_corpus(tmp_path):
    from ragloop.eval.runners import ensure_scifact_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "1", "title": "Aspirin", "text": "Aspirin relieves headaches."}\n'
                      '{"_id": "2", "title": "Moon", "text": "The moon is made of rock."}\n')
    msgs: list[str] = []
    r = ensure_scifact_index(str(tmp_path / "idx"), corpus, progress=msgs.append)
    assert r.num_documents == 2 and len(msgs) == 1
    assert r.search("what is the moon made of", k=1, mode="dense")[0].doc_id == "2"
    again = ensure_scifact_index(str(tmp_path / "idx"), corpus, progress=msgs.append)
    assert again.num_documents == 2 and len(msgs) == 1  # not rebuilt
