"""The retrieve-then-answer agent: passages in the prompt, citations, sources, fallbacks (scripted policy, real index)."""

from __future__ import annotations

import pytest

from ragloop.agents.factory import AgentSpec, build_agent
from ragloop.agents.rag import (
    RAGAgent,
    RAGConfig,
    attach_sources,
    cited_numbers,
    location_of,
    parse_claim_label,
    render_sources,
)
from ragloop.core.errors import UsageError
from ragloop.core.trace import Step, Trace
from ragloop.models.scripted import ScriptedPolicy
from ragloop.retrieval import HashingEmbedder, Retriever, build_index


@pytest.fixture()
def retriever(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "server.md").write_text("# Server\n\nThe admin server listens on port 8443 by default.\n")
    (docs / "colors.txt").write_text("The mascot of the project is a bluefin tuna.\n")
    build_index([str(docs)], str(tmp_path / "idx"), embedder=HashingEmbedder(64))
    with Retriever.open(str(tmp_path / "idx"), embedder=HashingEmbedder(64)) as r:
        yield r


def test_pure_helpers():
    assert cited_numbers("port 8443 [2], also [1][2]") == [2, 1]
    assert location_of({"page": 3}) == "page 3"
    assert location_of({"section": "Install", "line_start": 4, "line_end": 9}) == 'section "Install", lines 4-9'
    assert parse_claim_label("Refuted: the passage [1] says otherwise") == "REFUTES"
    assert parse_claim_label("NOT ENOUGH INFO.") == "NOT ENOUGH INFO"
    assert parse_claim_label("maybe") is None


def test_answers_from_passages_with_citations(retriever):
    policy = ScriptedPolicy(["The admin server listens on port 8443 [1]."])
    trace = RAGAgent(policy, retriever, RAGConfig(k=2, mode="bm25")).run("Which port does the admin server use?")
    assert trace.agent == "rag" and trace.finished and trace.fallback is None
    assert trace.answer == "The admin server listens on port 8443 [1]."
    assert trace.sources[0].source.endswith("server.md") and trace.sources[0].cited
    assert "8443" in trace.sources[0].text
    # the model saw the numbered passages
    prompt = policy.calls[0]
    assert "[1]" in str(prompt) and "8443" in str(prompt)
    text = render_sources(trace)
    assert "Sources:" in text and "server.md" in text and "cited" in text and "chunk " in text
    again = Trace.from_json(trace.to_json())
    assert again.sources == trace.sources


def test_uncited_answer_is_flagged_and_empty_answer_falls_back(retriever):
    t = RAGAgent(ScriptedPolicy(["bluefin"]), retriever, RAGConfig(k=2, mode="bm25")).run("Which port?")
    assert not any(s.cited for s in t.sources)
    assert "cites none of these passages" in render_sources(t)
    t2 = RAGAgent(ScriptedPolicy([""]), retriever, RAGConfig(k=1, mode="bm25")).run("Which port does the admin "
                                                                                   "server listen on?")
    assert t2.fallback == "extractive" and "8443" in t2.answer and t2.answer.endswith("[1]")


def test_claims_verdict_and_factory(retriever):
    agent = build_agent(ScriptedPolicy(["SUPPORTS. The passage says port 8443 [1]."]),
                        AgentSpec(kind="rag", task="claims"), retriever=retriever)
    t = agent.run("The admin server listens on port 8443.")
    assert t.answer == "SUPPORTS" and t.meta["answer_text"].startswith("SUPPORTS")
    with pytest.raises(UsageError, match="not math"):
        build_agent(ScriptedPolicy(["x"]), AgentSpec(kind="rag", task="math"), retriever=retriever)
    with pytest.raises(UsageError, match="needs an index"):
        RAGAgent(ScriptedPolicy(["x"]), None)


def test_attach_sources_for_react_steps(retriever):
    hit = retriever.search("port", k=1, mode="bm25")[0]
    t = Trace(agent="react", question="q", answer="8443",
              steps=[Step(index=1, retrieved_ids=[hit.chunk_id, "nonexistent"]),
                     Step(index=2, retrieved_ids=[hit.doc_id])])
    attach_sources(t, retriever)
    assert [s.n for s in t.sources] == [1, 2]
    assert t.sources[0].chunk_id == hit.chunk_id and t.sources[1].location == "(whole document)"


def test_old_trace_jsonl_still_loads():
    old = '{"schema_version": 1, "id": "x", "agent": "react", "question": "q", "answer": "a"}'
    assert Trace.from_json(old).sources == []


def test_a_model_that_invents_a_passage_is_stopped_and_the_fallback_says_so(retriever):
    # the 135M model was seen continuing the passage list ("[4] (Title) ...") instead of answering
    policy = ScriptedPolicy(["[4] (Server) The admin server listens on port 9999."])
    t = RAGAgent(policy, retriever, RAGConfig(k=3, mode="bm25")).run("Which port does the admin server listen on?")
    assert t.fallback == "extractive" and "8443" in t.answer
    assert "[4]" in t.decoding["stop"]


def test_cot_tie_is_recorded_and_shown():
    from ragloop.agents.cot import CoTAgent, CoTConfig
    from ragloop.agents.repl import answer_notes

    pol = ScriptedPolicy(["The answer is 5.", "The answer is 4.", "The answer is 4.", "The answer is 5."])
    t = CoTAgent(pol, CoTConfig(shots=0, self_consistency=4)).run("2 + 2?")
    assert t.answer == "5" and t.meta["votes"] == {"5": 2, "4": 2} and t.meta["tie"] == ["5", "4"]
    notes = "\n".join(answer_notes(t))
    assert "Votes: 5: 2 votes, 4: 2 votes" in notes and "Tie between 5, 4" in notes


def test_best_sentence_does_not_split_at_et_al():
    from ragloop.agents.rag import best_sentence

    passage = ("Nucleus sampling, introduced by Holtzman et al. (2020), keeps the smallest set of tokens whose "
               "cumulative probability reaches p. It adapts to the distribution.")
    assert best_sentence("What set of tokens does nucleus sampling keep?", passage).startswith(
        "Nucleus sampling, introduced by Holtzman et al. (2020), keeps the smallest set")


def test_react_fallback_is_said_with_the_fallback_votes():
    from ragloop.agents.repl import answer_notes

    t = Trace(agent="react", question="q", answer="yes", fallback="cot-sc",
              meta={"fallback_trace": {"meta": {"votes": {"yes": 3, "no": 2}}}})
    notes = "\n".join(answer_notes(t))
    assert "did not finish on its own" in notes and "without the documents" in notes
    assert "Votes: yes: 3 votes, no: 2 votes" in notes and "Tie" not in notes
