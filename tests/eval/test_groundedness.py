"""Groundedness (K-Precision against cited/retrieved passages) on literal traces, and reported by eval claims."""

from __future__ import annotations

import json
from pathlib import Path

from ragloop.core.trace import Source, Step, ToolCall, Trace
from ragloop.eval.groundedness import content_tokens, k_precision, summarize_groundedness, trace_groundedness


def test_tokens_and_k_precision():
    assert content_tokens("The server uses port 8443 [1].") == ["server", "uses", "port", "8443"]
    assert content_tokens("SUPPORTS. The answer is") == []
    assert k_precision("port 8443", ["It listens on port 8443."]) == 1.0
    assert k_precision("bluefin", ["It listens on port 8443."]) == 0.0
    assert k_precision("the", ["x"]) is None
    assert k_precision("admin port 9999 tuna", ["admin server port 8443"]) == 0.5


def _rag(text: str, cited: bool) -> Trace:
    return Trace(agent="rag", question="q", answer=text, meta={"answer_text": text}, sources=[
        Source(n=1, chunk_id="c1", text="The admin server listens on port 8443.", cited=cited),
        Source(n=2, chunk_id="c2", text="The mascot is a bluefin tuna.", cited=False)])


def test_rag_traces_use_cited_passages_first():
    g = trace_groundedness(_rag("The admin server listens on port 8443 [1].", True))
    assert g is not None and g.grounded and g.cites and g.k_precision == 1.0
    # cites [1] but says what only [2] holds: not grounded in what it cites
    bad = _rag("The mascot is a bluefin tuna [1].", True)
    assert not trace_groundedness(bad).grounded
    # no citation: checked against every retrieved passage
    assert trace_groundedness(_rag("bluefin tuna", False)).grounded


def test_react_uses_observations_and_the_last_thought_for_labels():
    t = Trace(agent="react", question="claim", answer="SUPPORTS", steps=[
        Step(index=1, thought="search it", action=ToolCall(name="Search", arguments={"query": "x"}),
             observation="Observation 1: <data> Aspirin relieves headaches in adults. </data>", retrieved_ids=["1"]),
        Step(index=2, thought="aspirin relieves headaches", action=ToolCall(name="Finish", arguments={"answer": "SUPPORTS"}))])
    g = trace_groundedness(t)
    assert g is not None and g.grounded and not g.cites
    fell_back = t.model_copy(update={"fallback": "cot-sc"})
    assert trace_groundedness(fell_back) is None  # the fallback answered without the documents
    assert trace_groundedness(Trace(agent="cot", question="q", answer="4")) is None
    s = summarize_groundedness([t, fell_back, _rag("The mascot is a bluefin tuna [1].", True)])
    assert s == {"grounded": 0.5, "k_precision": 0.5, "cited": 0.5, "measured": 2, "threshold": 0.5}


def test_eval_claims_with_rag_reports_groundedness(tmp_path: Path, capsys, ragloop_home):
    from ragloop.cli import main
    from ragloop.retrieval import HashingEmbedder, index_documents
    from ragloop.retrieval.loaders import documents_from_records

    idx = tmp_path / "idx"
    index_documents(documents_from_records([{"_id": "1", "title": "Aspirin", "text": "Aspirin relieves headaches."},
                                            {"_id": "2", "title": "Moon", "text": "The moon is made of rock."}]),
                    str(idx), embedder=HashingEmbedder(64))
    data = tmp_path / "c.csv"
    data.write_text("id,claim,evidence_label\n1,Aspirin relieves headaches.,SUPPORT\n2,The moon is cheese.,CONTRADICT\n")
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["SUPPORTS. Aspirin relieves headaches [1].",
                                  "REFUTES. Green cheese from Wisconsin [1]."]))
    rc = main(["eval", "claims", "--agent", "rag", "--index", str(idx), "--data", str(data), "--json", "--quiet",
               "--out", str(tmp_path / "t.jsonl"), "--policy", f"scripted:{script}"])
    out = capsys.readouterr().out
    assert rc == 0
    last = json.loads(out.strip().splitlines()[-1])
    assert last["accuracy"] == 1.0 and last["agent"] == "rag"
    assert last["groundedness"]["measured"] == 2 and last["groundedness"]["grounded"] == 0.5
    assert "groundedness 0.500 of 2 answers" in out
