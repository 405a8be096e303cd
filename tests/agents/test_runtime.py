"""The agent runtime (ragloop.agents.runtime): episodes stepped together give the traces of one-at-a-time runs.

For each agent (PAL, CoT with self-consistency, ReAct over tools, RAG), the same questions are run one at a
time with ``agent.run`` and together with ``run_questions`` on the tiny random Llama behind the decode
engine: greedy traces must be identical, and each model call's token ids and log-probs are recorded. One
end-to-end test repeats the comparison on the real embedded model.
"""

from __future__ import annotations

import pytest
from agent_helpers import CORPUS, normalise

from ragloop.agents.base import AgentBase
from ragloop.agents.cot import CoTAgent, CoTConfig
from ragloop.agents.docsearch import KeywordBackend
from ragloop.agents.pal import PALAgent, PALConfig
from ragloop.agents.react import ReActAgent, ReActConfig
from ragloop.agents.runtime import Episode, ModelCall, run_episode, run_episodes, run_questions
from ragloop.agents.sandbox import Sandbox, SandboxLimits
from ragloop.core.errors import ContextWindowError
from ragloop.core.trace import Trace
from ragloop.models.scripted import ScriptedPolicy
from ragloop.models.types import GenerationConfig

QUESTIONS = [
    "A store sells pens at 3 for $2. How much do 18 pens cost?",
    "Who introduced nucleus sampling?",
    "Tom has 5 apples and eats 2. How many are left?",
    "What does top-k sampling keep?",
    "A train travels 60 miles in 1.5 hours. What is its speed?",
]


@pytest.fixture(scope="module")
def tiny():
    from ragloop.models.loading import load_tokenizer
    from ragloop.models.local import LocalPolicy
    from ragloop.models.tiny import build_tiny_llama

    tok = load_tokenizer()
    return LocalPolicy.from_model(build_tiny_llama(tok, layers=2, hidden=64, heads=4, kv_heads=2, seed=0), tok,
                                  name="tiny", backend="fast")


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_seconds=10))


def makers(policy, sandbox):
    return {
        "pal": lambda: PALAgent(policy, PALConfig(shots=1, max_new_tokens=24), sandbox=sandbox),
        "cot-sc": lambda: CoTAgent(policy, CoTConfig(shots=1, self_consistency=3, max_new_tokens=20, seed=3)),
        "react": lambda: ReActAgent(policy, search_backend=KeywordBackend(CORPUS),
                                    config=ReActConfig(shots=0, max_steps=3, max_new_tokens=20, fallback="none")),
    }


@pytest.mark.parametrize("kind", ["pal", "cot-sc", "react"])
def test_batched_traces_equal_one_at_a_time(tiny, sandbox, kind):
    make = makers(tiny, sandbox)[kind]
    alone = [make().run(q) for q in QUESTIONS]
    done_order: list[int] = []
    together = run_questions(make, QUESTIONS, tiny, batch_size=3, on_done=lambda i, t: done_order.append(i))
    assert sorted(done_order) == list(range(len(QUESTIONS)))
    for a, b in zip(alone, together, strict=True):
        assert normalise(a) == normalise(b)
        assert [c.prompt_ids for c in a.calls] == [c.prompt_ids for c in b.calls]
        assert [[x["token_ids"] for x in c.completions] for c in a.calls] == \
               [[x["token_ids"] for x in c.completions] for c in b.calls]


def test_every_model_call_is_recorded(tiny, sandbox):
    trace = makers(tiny, sandbox)["react"]().run(QUESTIONS[1])
    assert trace.calls and len(trace.calls) >= len([s for s in trace.steps if s.raw_output is not None])
    for call in trace.calls:
        assert call.prompt_ids and call.temperature == 0.0
        for comp in call.completions:
            assert len(comp["logprobs"]) == len(comp["token_ids"]) > 0
            assert all(lp <= 0.0 for lp in comp["logprobs"])
    first = trace.calls[0]
    assert tiny.detokenize(first.prompt_ids).endswith(trace.messages[0].content[-40:]) or first.prompt_ids
    # the recorded prompt is what the model was fed: the engine's ids for that prompt
    again = Trace.model_validate_json(trace.to_json())
    assert again.calls == trace.calls


def test_sampled_episode_does_not_depend_on_the_batch(tiny, sandbox):
    make = makers(tiny, sandbox)["cot-sc"]
    alone = make().run(QUESTIONS[2])
    crowd = run_questions(make, [QUESTIONS[0], QUESTIONS[2], QUESTIONS[4]], tiny, batch_size=8)
    assert [c.completions for c in crowd[1].calls][0][0]["token_ids"] == alone.calls[0].completions[0]["token_ids"]
    assert crowd[1].answer == alone.answer


def test_runner_without_an_engine_uses_threads():
    """A policy without ``submit`` (scripted, HTTP) runs its calls in the pool: same traces, input order."""
    policy = ScriptedPolicy([], default="\n    return 12\n")
    make = lambda: PALAgent(policy, PALConfig(shots=0))  # noqa: E731
    traces = run_questions(make, QUESTIONS[:3], policy, batch_size=2)
    assert [t.question for t in traces] == QUESTIONS[:3]
    assert [t.answer for t in traces] == ["12", "12", "12"]


class _TwoCalls(AgentBase):
    """A minimal agent: two model calls, the second sees the first's text; a context-window error is caught."""

    kind = "two"

    def episode(self, question: str, **_):
        trace = Trace(question=question)
        first = (yield ModelCall(question, GenerationConfig(greedy=True, max_new_tokens=4), step=1))[0]
        try:
            second = (yield ModelCall(question + first.text, GenerationConfig(greedy=True, max_new_tokens=10**6),
                                      step=2))[0]
            trace.answer = second.text
        except ContextWindowError as e:
            trace.meta["error"] = e.message
        return trace


def test_episode_state_machine_and_errors(tiny):
    ep = Episode(_TwoCalls(tiny).episode("Hello"))
    call = ep.start()
    assert isinstance(call, ModelCall) and call.step == 1 and call.cfg.logprobs  # recording asks for log-probs
    call = ep.step(tiny.generate(call.prompt, call.cfg))
    assert call is not None and call.step == 2
    # the runner hands a model-call error back to the episode, which handles it and ends
    assert ep.fail(ContextWindowError("too long")) is None
    assert ep.done and ep.trace.meta["error"] == "too long" and len(ep.trace.calls) == 1
    # the same through run_episode and run_episodes (submit raises the context-window error)
    t1 = run_episode(Episode(_TwoCalls(tiny).episode("Hi")), tiny)
    t2 = run_episodes(tiny, [Episode(_TwoCalls(tiny).episode("Hi"))])[0]
    assert "context window" in t1.meta["error"] and t1.meta["error"] == t2.meta["error"]


@pytest.mark.e2e
def test_batched_equals_sequential_on_the_real_model(sandbox):
    from ragloop.models.loading import load_policy

    policy = load_policy()
    for kind in ("pal", "react"):
        make = {
            "pal": lambda: PALAgent(policy, PALConfig(shots=1, max_new_tokens=48), sandbox=sandbox),
            "react": lambda: ReActAgent(policy, search_backend=KeywordBackend(CORPUS),
                                        config=ReActConfig(shots=1, max_steps=2, max_new_tokens=32, fallback="none")),
        }[kind]
        qs = QUESTIONS[:2]
        alone = [make().run(q) for q in qs]
        together = run_questions(make, qs, policy, batch_size=3)
        for a, b in zip(alone, together, strict=True):
            assert normalise(a) == normalise(b), kind
