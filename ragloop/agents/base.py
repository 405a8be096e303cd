"""What every agent shares: live events, the generation call that records tokens, answers and voting.

- ``AgentEvent``: what an agent reports while it runs (tokens, thoughts, actions, observations, code,
  answers) to an optional ``on_event`` callback — the REPL draws its live view from these.
- ``AgentBase``: holds the policy and the callback. An agent writes its loop once, as ``episode(question)``
  (a generator of ``ModelCall``s, see ``ragloop.agents.runtime``); ``run(question)`` drives that one
  episode (streaming tokens when someone listens), and the runners drive many together;
  ``_new_trace``/``_close_trace`` stamp the policy id, decoding settings, seed and timing on the Trace.
- ``canonical_answer`` / ``majority_vote``: the vote of self-consistency (Wang et al. 2023,
  "Self-Consistency Improves Chain of Thought Reasoning in Language Models") over normalised answers.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ragloop.agents.calculator import format_number
from ragloop.agents.runtime import Episode, EpisodeGen, run_episode
from ragloop.core.trace import Message, Trace
from ragloop.models.types import GenerationConfig, Policy, Prompt

log = logging.getLogger(__name__)

EventKind = Literal[
    "start", "token", "thought", "action", "observation", "code", "result", "answer", "error", "fallback",
    "sample",
]


@dataclass(frozen=True)
class AgentEvent:
    """One thing that happened during a run (``step`` is 0 when not tied to a step)."""

    kind: EventKind
    text: str
    step: int = 0
    data: dict[str, Any] | None = None


EventHandler = Callable[[AgentEvent], None]


def greedy_config(max_new_tokens: int = 256, seed: int | None = 0) -> GenerationConfig:
    """The deterministic decoding used by evaluation: greedy, fixed seed."""
    return GenerationConfig(max_new_tokens=max_new_tokens, greedy=True, temperature=0.0, seed=seed)


class AgentBase:
    """Policy + event callback + the bookkeeping every agent repeats."""

    kind = "agent"

    def __init__(self, policy: Policy, *, on_event: EventHandler | None = None) -> None:
        self.policy = policy
        self.on_event = on_event

    def _emit(self, kind: EventKind, text: str, step: int = 0, **data: Any) -> None:
        if self.on_event is not None:
            self.on_event(AgentEvent(kind, text, step, data or None))

    def episode(self, question: str, **kwargs: Any) -> EpisodeGen:
        """The agent's loop as an episode (``ragloop.agents.runtime``): yields ``ModelCall``s, returns a Trace."""
        raise NotImplementedError(f"{type(self).__name__} has no episode()")

    def run(self, question: str, **kwargs: Any) -> Trace:
        """Answer one question: the runtime with one episode. Tokens stream to ``on_event`` when set; the
        Trace records every model call's token ids and log-probs (``trace.calls``)."""
        on_token = None
        if self.on_event is not None:
            def on_token(piece: str, step: int) -> None:
                self._emit("token", piece, step)
        return run_episode(Episode(self.episode(question, **kwargs)), self.policy, on_token=on_token)

    def _new_trace(self, question: str, cfg: GenerationConfig, *, task: str | None = None,
                   meta: dict[str, Any] | None = None) -> Trace:
        return Trace(
            agent=self.kind,
            task=task,
            question=question,
            policy=getattr(self.policy, "name", type(self.policy).__name__),
            decoding=decoding_settings(self.policy, cfg),
            seed=cfg.seed,
            meta=dict(meta or {}),
        )

    @staticmethod
    def _close_trace(trace: Trace, t0: float) -> Trace:
        trace.seconds = round(time.perf_counter() - t0, 4)
        trace.tokens_in = sum(s.tokens_in for s in trace.steps)
        trace.tokens_out = sum(s.tokens_out for s in trace.steps)
        return trace


def decoding_settings(policy: Any, cfg: GenerationConfig) -> dict[str, Any]:
    """What a Trace records as its decoding settings: the GenerationConfig plus the policy's decode weights
    (``precision``, resolved: "auto" is recorded as what it became, e.g. "int4") where the policy has them."""
    out = cfg.to_dict()
    precision = getattr(policy, "precision", None)
    if isinstance(precision, str):
        out["precision"] = precision
    return out


def with_changes(cfg: GenerationConfig, **changes: Any) -> GenerationConfig:
    """A validated copy of ``cfg`` with ``changes`` (the dataclass ``replace`` re-runs ``__post_init__``)."""
    return dataclasses.replace(cfg, **changes)


def messages_of(prompt: Prompt) -> list[Message]:
    """The prompt as Trace messages: a raw string is one user message (the caller notes ``raw`` in meta)."""
    if isinstance(prompt, str):
        return [Message(role="user", content=prompt)]
    out = []
    for m in prompt:
        if isinstance(m, Message):
            out.append(m)
        else:
            out.append(Message(role=m["role"], content=m["content"]))  # type: ignore[arg-type]
    return out


_NUM_RE = re.compile(r"^-?\$?\s*-?[\d,]*\.?\d+\s*%?$")


def canonical_answer(answer: str | None) -> str | None:
    """Answers that mean the same compare equal: numbers lose ``$``, commas, trailing ``.0``; text is
    case- and space-folded. ``canonical_answer("$1,200.00") -> "1200"``, ``canonical_answer(" Yes. ") -> "yes"``.
    """
    if answer is None:
        return None
    a = answer.strip().rstrip(".").strip()
    if not a:
        return None
    if _NUM_RE.match(a):
        num = a.replace("$", "").replace(",", "").replace("%", "").replace(" ", "")
        try:
            return format_number(float(num)) if "." in num else str(int(num))
        except ValueError:
            pass
    return " ".join(a.lower().split())


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent canonical answer (ties: the one seen first) and the vote counts.

    ``majority_vote(["3", "4", "3.0", None]) -> ("3", {"3": 2, "4": 1})``
    """
    keys = [canonical_answer(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None, {}
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    return winner, dict(counts)
