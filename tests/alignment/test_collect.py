"""Batched agent runs on the runtime: the same traces as running the agent one question at a time (tiny
model, greedy, real sandbox), multi-step agents too, seeded samples per question, scoring and the summary."""

from __future__ import annotations

import pytest

from ragloop.alignment.collect import run_agent_batched, score_gsm8k, summarize
from ragloop.core.trace import Feedback, Trace
from ragloop.models.local import LocalPolicy
from ragloop.models.types import GenerationConfig

QS = ["Tom has 3 apples and buys 2 more. How many apples?", "What is 6 times 7?", "A box holds 12 eggs. How many in 3 boxes?"]


@pytest.fixture(scope="module")
def setup(smol_tokenizer):
    from ragloop.agents.pal import PALAgent, PALConfig
    from ragloop.agents.sandbox import Sandbox
    from ragloop.models.tiny import build_tiny_llama

    policy = LocalPolicy.from_model(build_tiny_llama(smol_tokenizer, layers=2, hidden=32, heads=4, kv_heads=2),
                                    smol_tokenizer, name="tiny")

    def make(pol, sandbox):
        return PALAgent(pol, PALConfig(shots=1, max_new_tokens=12), sandbox=sandbox)

    return policy, make, Sandbox()


def test_batched_equals_sequential(setup):
    policy, make, sandbox = setup
    batched = [ts[0] for ts in run_agent_batched(make, policy, QS, sandbox=sandbox, batch_size=2)]
    seq = [make(policy, sandbox).run(q) for q in QS]
    for b, s in zip(batched, seq, strict=True):
        assert [m.model_dump() for m in b.messages] == [m.model_dump() for m in s.messages]
        assert b.answer == s.answer and b.finished == s.finished
        assert [st.error_type for st in b.steps] == [st.error_type for st in s.steps]


def test_samples_per_question_and_scoring(setup):
    policy, make, sandbox = setup
    groups = run_agent_batched(make, policy, QS[:2], samples=3, sandbox=sandbox,
                               decoding=GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5))
    assert [len(g) for g in groups] == [3, 3]
    assert {t.meta["sample"]["candidate"] for t in groups[0]} == {0, 1, 2}
    assert groups[0][0].decoding["temperature"] == 1.0
    # each sample is seeded by (seed, question, candidate): the same whatever else is in the batch
    alone = run_agent_batched(make, policy, QS[1:2], samples=3, sandbox=sandbox,
                              decoding=GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5))
    assert [t.meta["sample"]["seed"] for t in alone[0]] != [t.meta["sample"]["seed"] for t in groups[1]]
    again = run_agent_batched(make, policy, QS[:2], samples=3, sandbox=sandbox, batch_size=1,
                              decoding=GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5))
    assert [[s.raw_output for s in t.steps] for t in again[1]] == [[s.raw_output for s in t.steps] for t in groups[1]]
    t = score_gsm8k(Trace(question="q", answer="42.0"), "42")
    assert t.feedback.correct is True and t.feedback.gold == "42"
    assert score_gsm8k(Trace(question="q", answer=None), "42").feedback.correct is False


def test_summary_and_multi_step_agents(setup):
    ts = [Trace(question="a", answer="1", finished=True, feedback=Feedback(correct=True)),
          Trace(question="b", answer=None, finished=False, feedback=Feedback(correct=False))]
    s = summarize(ts)
    assert (s.n, s.correct, s.accuracy, s.format_valid) == (2, 1, 0.5, 0.5)
    assert s.ci95[0] < 0.5 < s.ci95[1]
    policy, _, _ = setup
    from ragloop.agents.react import ReActAgent, ReActConfig, react_tools_for

    def make_react(pol, sandbox):  # several model calls per question (the record/replay path could not)
        return ReActAgent(pol, tools=react_tools_for("calculator"),
                          config=ReActConfig(shots=0, max_steps=3, max_new_tokens=10, fallback="none"))

    batched = [ts[0] for ts in run_agent_batched(make_react, policy, QS, batch_size=3)]
    seq = [make_react(policy, None).run(q) for q in QS]
    assert [[st.raw_output for st in t.steps] for t in batched] == [[st.raw_output for st in t.steps] for t in seq]
    assert all(len(t.calls) >= len(t.steps) >= 1 for t in batched)  # a repair may add a call to a step
