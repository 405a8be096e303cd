"""Run a single-generation agent (PAL, CoT) over many questions with batched decoding, and score the traces.

An agent calls ``policy.generate`` once per question; run one question at a time, a CPU decodes one
sequence at a time. ``run_agent_batched`` keeps the agent's own code in charge of prompts, parsing, tools
and trace records, and batches only the decoding, in three passes:

1. *record*: the agent runs with a policy that records the (prompt, decoding settings) it asks for and
   answers with an empty generation, and with a stand-in executor (its output is discarded);
2. *decode*: every recorded prompt is decoded in batches (``policy.generate_batch``), ``n`` candidates each;
3. *replay*: the agent runs again on each question with the real executor and a policy that returns the
   batched generation for that prompt — the trace is exactly what the agent produces for that text.

Candidate ``j`` of a question is the ``j``-th sample of one batched call; the trace's ``meta["batched"]``
records the batch seed, so samples are reproducible. ``score_gsm8k`` sets ``feedback.correct`` by numeric
match with the gold answer; ``summarize`` gives accuracy with a Wilson 95% interval, format validity and
mean steps/tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ragloop.agents.base import decoding_settings
from ragloop.core.errors import UsageError
from ragloop.core.trace import Trace
from ragloop.models.types import Generation, GenerationConfig, Prompt

log = logging.getLogger(__name__)

AgentFactory = Callable[[Any, Any], Any]  # (policy, sandbox or None) -> agent with .run(question) -> Trace


class _NullSandbox:
    """Answers every program with a failure; used only in the record pass, whose traces are discarded."""

    def run(self, source: str, entry: str | None = "solution") -> Any:
        from ragloop.agents.sandbox import SandboxResult

        return SandboxResult(ok=False, error_type="not-run", message="record pass")


class _Delegate:
    """Forwards everything but ``generate`` to the real policy (tokenizer, render, context window …)."""

    def __init__(self, policy: Any) -> None:
        self._policy = policy
        self.name = policy.name
        self.context_window = policy.context_window

    def __getattr__(self, item: str) -> Any:
        return getattr(self._policy, item)


class _RecordingPolicy(_Delegate):
    def __init__(self, policy: Any) -> None:
        super().__init__(policy)
        self.calls: list[tuple[Prompt, GenerationConfig]] = []

    def generate(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> list[Generation]:
        cfg = cfg or GenerationConfig()
        self.calls.append((prompt, cfg))
        return [Generation(text="", token_ids=[], finish_reason="length")] * cfg.n

    def stream(self, prompt: Prompt, cfg: GenerationConfig | None = None):  # pragma: no cover - agents stream only with listeners
        raise UsageError("batched agent runs do not stream")


class _ReplayPolicy(_Delegate):
    def __init__(self, policy: Any, answers: list[Generation]) -> None:
        super().__init__(policy)
        self.answers = answers

    def generate(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> list[Generation]:
        n = (cfg or GenerationConfig()).n
        if len(self.answers) < n:
            raise UsageError("the agent asked for more generations on replay than it did when recorded "
                             "(batched runs support agents that generate once per question)")
        out, self.answers = self.answers[:n], self.answers[n:]
        return out


def run_agent_batched(
    make_agent: AgentFactory,
    policy: Any,
    questions: Sequence[str],
    *,
    samples: int = 1,
    decoding: GenerationConfig | None = None,
    batch_size: int = 16,
    sandbox: Any = None,
    task: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Trace]]:
    """``samples`` traces per question. ``decoding`` overrides the agent's settings for the batched decode
    (e.g. sampling at temperature 0.8 to collect diverse traces); None keeps the agent's own (greedy in
    evaluation). ``make_agent(policy, sandbox)`` builds the agent around the given policy/executor."""
    if not questions:
        return []
    rec = _RecordingPolicy(policy)
    rec_agent = make_agent(rec, _NullSandbox())
    prompts: list[Prompt] = []
    cfgs: list[GenerationConfig] = []
    for q in questions:
        before = len(rec.calls)
        rec_agent.run(q, task=task) if task else rec_agent.run(q)
        if len(rec.calls) != before + 1:
            raise UsageError("run_agent_batched needs an agent that generates exactly once per question")
        prompts.append(rec.calls[-1][0])
        cfgs.append(rec.calls[-1][1])
    base = decoding or cfgs[0]
    stops = list(dict.fromkeys([*base.stop, *cfgs[0].stop]))
    gcfg = replace(base, n=samples, stop=stops)
    gens: list[list[Generation]] = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        gens += policy.generate_batch(prompts[s : s + batch_size], replace(gcfg, seed=(gcfg.seed or 0) + s))
        if progress:
            progress(min(len(prompts), s + batch_size), len(prompts))
    log.info("decoded %d × %d candidates in %.1f s", len(prompts), samples, time.perf_counter() - t0)
    out: list[list[Trace]] = []
    for i, (q, cands) in enumerate(zip(questions, gens, strict=True)):
        traces = []
        for j, g in enumerate(cands):
            agent = make_agent(_ReplayPolicy(policy, [g]), sandbox)
            t = agent.run(q, task=task) if task else agent.run(q)
            t.decoding = decoding_settings(policy, gcfg)
            t.meta["batched"] = {"seed": (gcfg.seed or 0) + (i // batch_size) * batch_size,
                                 "prompt_index": i % batch_size, "candidate": j}
            traces.append(t)
        out.append(traces)
    return out


# ------------------------------------------------------------------------------------------ scoring


def score_gsm8k(trace: Trace, gold: str) -> Trace:
    """Set ``feedback.correct``/``gold`` by numeric match of the trace's answer with the gold number."""
    from ragloop.eval.metrics import numeric_match

    trace.feedback.gold = gold
    trace.feedback.correct = bool(trace.answer is not None and numeric_match(trace.answer, gold) == 1.0)
    return trace


@dataclass
class EvalSummary:
    """Accuracy with a Wilson 95% interval and trace-quality figures over one slice."""

    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    format_valid: float
    mean_steps: float
    mean_tokens_out: float
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci95": list(self.ci95),
                "format_valid": self.format_valid, "mean_steps": self.mean_steps,
                "mean_tokens_out": self.mean_tokens_out, "seconds": round(self.seconds, 1)}


def summarize(traces: Sequence[Trace], *, seconds: float = 0.0) -> EvalSummary:
    from ragloop.alignment.data import format_valid
    from ragloop.eval.stats import wilson_ci

    n = len(traces)
    k = sum(1 for t in traces if t.feedback.correct)
    fv = sum(1 for t in traces if format_valid(t))
    return EvalSummary(
        n=n, correct=k, accuracy=k / n if n else 0.0, ci95=wilson_ci(k, n), format_valid=fv / n if n else 0.0,
        mean_steps=sum(len(t.steps) for t in traces) / n if n else 0.0,
        mean_tokens_out=sum(t.tokens_out for t in traces) / n if n else 0.0, seconds=seconds,
    )
