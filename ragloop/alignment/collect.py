"""Run an agent over many questions on the batched runtime, several samples each, and score the traces.

``run_agent_batched`` is the improve loop's collection and evaluation: every (question, sample) pair is an
episode of the agent (``ragloop.agents.runtime``), all stepped together so that their model calls are
decoded as one batch — any agent, single-step (PAL, CoT) or multi-step (ReAct). ``decoding`` replaces the
agent's own settings (e.g. sampling at temperature 0.8 to collect diverse traces); sample ``j`` of
question ``i`` is seeded by ``(decoding.seed, i, j)`` (``trace.meta["sample"]``), so collection is
reproducible whatever the batch. ``score_gsm8k`` sets ``feedback.correct`` by numeric match with the gold
answer; ``summarize`` gives accuracy with a Wilson 95% interval, format validity and mean steps/tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ragloop.core.trace import Trace
from ragloop.models.decoding import derive_seed
from ragloop.models.types import GenerationConfig

log = logging.getLogger(__name__)

AgentFactory = Callable[[Any, Any], Any]  # (policy, sandbox or None) -> agent with .episode(question)


def run_agent_batched(
    make_agent: AgentFactory,
    policy: Any,
    questions: Sequence[str],
    *,
    samples: int = 1,
    decoding: GenerationConfig | None = None,
    batch_size: int | None = None,
    sandbox: Any = None,
    task: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Trace]]:
    """``samples`` traces per question, as episodes decoded together. ``decoding`` overrides the agent's
    settings (stop strings are merged with the agent's, ``n`` stays the agent's); None keeps the agent's own
    (greedy in evaluation). ``make_agent(policy, sandbox)`` builds one agent per episode."""
    from ragloop.agents.runtime import Episode, run_episodes

    if not questions:
        return []
    if samples < 1:
        from ragloop.core.errors import UsageError

        raise UsageError(f"samples must be >= 1, got {samples}")
    pairs = [(i, j) for i in range(len(questions)) for j in range(samples)]

    def transform_for(i: int, j: int) -> Callable[[GenerationConfig], GenerationConfig] | None:
        if decoding is None:
            return None
        seed = derive_seed(decoding.seed or 0, i, j)

        def tf(cfg: GenerationConfig) -> GenerationConfig:
            stops = list(dict.fromkeys([*decoding.stop, *cfg.stop]))
            return dataclasses.replace(decoding, n=cfg.n, stop=stops, seed=seed,
                                       grammar=decoding.grammar or cfg.grammar)

        return tf

    eps = []
    for i, j in pairs:
        agent = make_agent(policy, sandbox)
        gen = agent.episode(questions[i], task=task) if task else agent.episode(questions[i])
        eps.append(Episode(gen, transform=transform_for(i, j)))
    done = 0

    def on_done(_: int, __: Trace) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(eps))

    t0 = time.perf_counter()
    traces = run_episodes(policy, eps, batch_size=batch_size, on_done=on_done)
    log.info("ran %d × %d episodes in %.1f s", len(questions), samples, time.perf_counter() - t0)
    out: list[list[Trace]] = [[] for _ in questions]
    for (i, j), t in zip(pairs, traces, strict=True):
        if decoding is not None:
            t.decoding = {**t.decoding, **decoding.to_dict(), "seed": derive_seed(decoding.seed or 0, i, j)}
            t.meta["sample"] = {"question": i, "candidate": j, "seed": derive_seed(decoding.seed or 0, i, j)}
        out[i].append(t)
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
