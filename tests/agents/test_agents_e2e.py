"""End-to-end runs on the real embedded models (SmolLM2-135M-Instruct, MiniLM, FAISS, the sandbox process).

Few and short (small budgets): they check that the real pieces fit together and that the Trace is
complete, not the 135M model's accuracy (that is measured by the benchmark runners, see RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ragloop.agents.cot import CoTAgent, CoTConfig
from ragloop.agents.pal import PALAgent, PALConfig
from ragloop.agents.react import ReActAgent, ReActConfig

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_ERRORS = {"validation", "timeout", "memory", "output_limit", "runtime", "no_entry", "bad_value", "crashed"}


@pytest.fixture(scope="module")
def policy():
    from ragloop.models import load_policy

    return load_policy("default")


class CountingPolicy:
    """Forwards to a real policy, counting generate calls (to check self-consistency batches its samples)."""

    def __init__(self, inner):
        self.inner, self.generate_calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompt, cfg=None):
        self.generate_calls += 1
        return self.inner.generate(prompt, cfg)


def test_pal_on_the_real_model(policy):
    trace = PALAgent(policy, PALConfig(shots=2, max_new_tokens=80)).run(
        "Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?")
    step = trace.steps[0]
    assert step.code is not None and step.code.startswith('def solution():\n    """Tom has 3 apples.')
    assert step.observation is not None or step.error_type in SANDBOX_ERRORS
    assert trace.tokens_out > 0 and trace.tokens_in > 0 and trace.decoding["greedy"] and trace.seed == 0
    assert trace.messages[0].role == "user" and trace.messages[-1].content == step.raw_output
    assert trace.answer == "7"


def test_react_on_the_real_model_over_a_real_index(policy, tmp_path):
    from ragloop.retrieval import Retriever
    from ragloop.retrieval.indexer import build_index

    build_index([ROOT / "examples" / "corpus"], tmp_path / "idx")
    retriever = Retriever.open(tmp_path / "idx")
    cfg = ReActConfig(shots=1, max_steps=2, max_new_tokens=48, fallback="none")
    trace = ReActAgent(policy, retriever=retriever, config=cfg).run("What does nucleus sampling keep?")
    assert 1 <= len(trace.steps) <= 2
    for s in trace.steps:
        assert s.raw_output is not None and (s.action is not None or s.error_type in {"no-action", "bad-action",
                                                                                     "planted-action"})
        if s.action is not None and s.action.name == "Search":
            assert s.retrieved_ids and all(retriever.get(cid) is not None for cid in s.retrieved_ids)
            assert s.observation.startswith(f"Observation {s.index}: <data>")
    assert trace.meta["stop_reason"] in {"finish", "max-steps", "max-tokens"}


def test_cot_self_consistency_samples_in_one_batched_call(policy):
    counting = CountingPolicy(policy)
    trace = CoTAgent(counting, CoTConfig(shots=1, self_consistency=3, max_new_tokens=40, seed=5)).run(
        "There are 2 cars and 3 more arrive. How many cars are there?")
    assert counting.generate_calls == 1 and len(trace.steps) == 3
    assert trace.decoding["n"] == 3 and not trace.decoding["greedy"] and trace.seed == 5
    assert sum(trace.meta["votes"].values()) == sum(1 for s in trace.steps if s.error_type is None)


def test_rag_on_the_real_model(policy, tmp_path):
    """Passages, sources with file and location, the model's text, groundedness measurable (not accuracy)."""
    from ragloop.agents.rag import RAGAgent, RAGConfig, render_sources
    from ragloop.eval.groundedness import trace_groundedness
    from ragloop.retrieval import HashingEmbedder, Retriever, build_index

    build_index([ROOT / "examples" / "corpus"], tmp_path / "idx", embedder=HashingEmbedder(256))
    retriever = Retriever.open(tmp_path / "idx", embedder=HashingEmbedder(256))
    trace = RAGAgent(policy, retriever, RAGConfig(k=2, max_new_tokens=48)).run(
        "What value of k does reciprocal rank fusion use by default?")
    assert [s.n for s in trace.sources] == [1, 2] and all(s.source.endswith(".md") for s in trace.sources)
    assert trace.steps[0].retrieved_ids == [s.chunk_id for s in trace.sources]
    assert trace.steps[1].raw_output is not None and trace.tokens_out > 0
    assert trace.answer  # the model's text, or the extractive fallback, which is then recorded
    assert trace.finished or trace.fallback == "extractive"
    assert trace.messages[-1].role == "assistant" and "[1]" in trace.messages[1].content
    assert "Sources:" in render_sources(trace)
    assert trace_groundedness(trace) is not None
