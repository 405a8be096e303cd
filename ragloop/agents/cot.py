"""Chain-of-thought prompting and self-consistency.

- Zero-shot CoT (Kojima et al. 2022, "Large Language Models are Zero-Shot Reasoners"): the answer is
  prompted with "Let's think step by step."
- One-/few-shot CoT (Wei et al. 2022): worked exemplars, by default the 8 GSM8K ones in the
  lm-evaluation-harness ``gsm8k_cot`` layout (``Q: …\\nA: … The answer is N.``); with an embedder, the k
  exemplars of a pool most similar to the question (Liu et al. 2022); always fitted to the context window.
- Self-consistency (Wang et al. 2023): n reasoning paths sampled in ONE batched ``generate`` call
  (``cfg.n``), answers parsed from each, majority vote.

The answer is read from the model's text with the format's pattern (``The answer is N``); when that is
missing the last number is taken and the repair is recorded (``finished`` then stays False).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ragloop.agents.base import (
    AgentBase,
    EventHandler,
    canonical_answer,
    greedy_config,
    majority_vote,
    messages_of,
    with_changes,
)
from ragloop.agents.prompts import Exemplar, fit_exemplars, load_cot_exemplars, select_exemplars
from ragloop.agents.runtime import EpisodeGen, ModelCall
from ragloop.core.errors import UsageError
from ragloop.core.trace import Message, Step
from ragloop.models.grammar import cot_grammar
from ragloop.models.types import GenerationConfig, Policy, Prompt

ZERO_SHOT_TRIGGER = "Let's think step by step."


@dataclass(frozen=True)
class CoTFormat:
    """How questions, rationales and answers are laid out, and how the answer is read back."""

    question_prefix: str = "Q: "
    answer_prefix: str = "A:"
    answer_regex: str = r"The answer is\s*\$?\s*(-?[0-9][0-9.,]*)"
    answer_kind: Literal["number", "text", "label"] = "number"  # label: upper-cased
    system: str = "Solve the problem. Think step by step, then finish with 'The answer is N.'"
    stop: tuple[str, ...] = ("\nQ:", "\n\n\n")


GSM8K_FORMAT = CoTFormat()
# the ReAct paper's FEVER CoT layout (``Claim: …\nThought: … \nAnswer: SUPPORTS``)
FEVER_FORMAT = CoTFormat(
    question_prefix="Claim: ",
    answer_prefix="Thought:",
    answer_regex=r"^\s*Answer\s*:\s*(SUPPORTS|REFUTES|NOT ENOUGH INFO)",
    answer_kind="label",
    system="Decide whether the claim is SUPPORTS, REFUTES or NOT ENOUGH INFO. Think step by step, then "
    "write 'Answer: <label>'.",
    stop=("\nClaim:", "\n\n\n"),
)
# the ReAct paper's HotpotQA CoT layout (``Question: …\nThought: …\nAnswer: …``)
QA_FORMAT = CoTFormat(
    question_prefix="Question: ",
    answer_prefix="Thought:",
    answer_regex=r"^\s*Answer\s*:\s*(.+?)\s*$",
    answer_kind="text",
    system="Answer the question. Think step by step, then write 'Answer: <answer>'.",
    stop=("\nQuestion:", "\n\n\n"),
)

_LAST_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def parse_answer(text: str, fmt: CoTFormat = GSM8K_FORMAT) -> tuple[str | None, list[str]]:
    """The answer in ``text`` and the repairs needed to read it.

    ``parse_answer("3 + 2 = 5. The answer is 5.") -> ("5", [])``;
    ``parse_answer("so we get 12 apples") -> ("12", ["last-number"])``.
    """
    m = re.search(fmt.answer_regex, text, re.I | re.M)
    if m is not None:
        ans = m.group(1).strip()
        if fmt.answer_kind == "number":
            return ans.rstrip(".,").replace(",", ""), []
        return (ans.upper() if fmt.answer_kind == "label" else ans), []
    if fmt.answer_kind == "number":
        nums = _LAST_NUMBER_RE.findall(text)
        if nums:
            return nums[-1].replace("$", "").replace(",", "").rstrip("."), ["last-number"]
    return None, []


@dataclass
class CoTConfig:
    """Settings of a CoT run. ``shots=0`` is zero-shot; ``self_consistency>1`` samples and votes."""

    shots: int = 8  # exemplars in the prompt (0 = zero-shot "Let's think step by step")
    exemplars: list[Exemplar] | None = None  # the pool; default: the 8 GSM8K exemplars
    embedder: Any = None  # with a pool, choose the most similar exemplars
    format: CoTFormat = field(default_factory=CoTFormat)
    prompt_style: Literal["raw", "chat"] = "raw"
    max_new_tokens: int = 256
    self_consistency: int = 1  # n samples (1 = greedy single path)
    temperature: float = 0.7  # for self-consistency samples
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = 0
    decoding: GenerationConfig | None = None  # overrides the settings above for a single path
    # grammar-constrained (number answers only): reasoning lines, then "The answer is N." on its own line
    # (ragloop.models.grammar.cot_grammar); the exemplars are shown in that layout too
    constrained: bool = False

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise UsageError(f"shots must be >= 0, got {self.shots}")
        if self.self_consistency < 1:
            raise UsageError(f"self_consistency must be >= 1, got {self.self_consistency}")
        if self.prompt_style not in ("raw", "chat"):
            raise UsageError(f"prompt_style must be 'raw' or 'chat', got {self.prompt_style!r}")


def final_answer_line(answer: str) -> str:
    """An exemplar's rationale with its ``The answer is N.`` on a line of its own (the constrained layout):
    ``final_answer_line("2 + 3 = 5. The answer is 5.") -> "2 + 3 = 5.\nThe answer is 5."``."""
    return re.sub(r"\s+(The answer is)", r"\n\1", answer)


def build_cot_prompt(question: str, exemplars: list[Exemplar], fmt: CoTFormat, style: str,
                     *, final_line: bool = False) -> Prompt:
    """The CoT prompt for ``question`` with ``exemplars`` (zero-shot trigger when there are none);
    ``final_line`` shows each exemplar's answer phrase on its own line (what the CoT grammar writes)."""
    if final_line:
        exemplars = [Exemplar(e.question, final_answer_line(e.answer), id=e.id) for e in exemplars]
    qp, ap = fmt.question_prefix, fmt.answer_prefix
    if style == "raw":
        parts = [f"{qp}{e.question}\n{ap} {e.answer}\n\n" for e in exemplars]
        tail = f"{qp}{question}\n{ap}" + ("" if exemplars else f" {ZERO_SHOT_TRIGGER}")
        return "".join(parts) + tail
    msgs: list[dict[str, str]] = [{"role": "system", "content": fmt.system}]
    for e in exemplars:
        msgs += [{"role": "user", "content": f"{qp}{e.question}"}, {"role": "assistant", "content": e.answer}]
    user = f"{qp}{question}" + ("" if exemplars else f"\n{ZERO_SHOT_TRIGGER}")
    msgs.append({"role": "user", "content": user})
    return msgs


class CoTAgent(AgentBase):
    """Chain of thought, optionally with self-consistency: ``CoTAgent(policy).run(question) -> Trace``."""

    concurrent_safe = True  # no per-run state on the agent: one instance may run many episodes at once

    kind = "cot"

    def __init__(self, policy: Policy, config: CoTConfig | None = None, *, on_event: EventHandler | None = None):
        super().__init__(policy, on_event=on_event)
        self.config = config or CoTConfig()

    def _pool(self) -> list[Exemplar]:
        return list(self.config.exemplars) if self.config.exemplars is not None else load_cot_exemplars()

    @property
    def constrained(self) -> bool:
        """Constrained decoding applies: asked for, and the format's answer is a number."""
        return self.config.constrained and self.config.format.answer_kind == "number"

    def decoding(self) -> GenerationConfig:
        c = self.config
        # constrained: the grammar ends the text itself; the format's stop strings ("\n\n\n") could cut a
        # valid text short, so they are dropped
        grammar = cot_grammar(max_line_tokens=max(8, c.max_new_tokens // 4 - 8)) if self.constrained else None
        stop = [] if grammar is not None else list(c.format.stop)
        if c.self_consistency > 1:
            return GenerationConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                    top_k=c.top_k, n=c.self_consistency, seed=c.seed, stop=stop, grammar=grammar)
        base = c.decoding or greedy_config(c.max_new_tokens, c.seed)
        return with_changes(base, n=1, stop=list(dict.fromkeys([*base.stop, *stop])), grammar=grammar)

    def episode(self, question: str, *, task: str | None = None) -> EpisodeGen:
        if not question or not question.strip():
            raise UsageError("the question is empty")
        c = self.config
        t0 = time.perf_counter()
        cfg = self.decoding()
        pool = self._pool() if c.shots else []
        chosen = select_exemplars(pool, min(c.shots, len(pool)), query=question, embedder=c.embedder) if c.shots else []
        kept, prompt = fit_exemplars(
            chosen, lambda ex: build_cot_prompt(question, ex, c.format, c.prompt_style, final_line=self.constrained),
            self.policy,
            reserve_tokens=cfg.max_new_tokens,
        )
        trace = self._new_trace(question, cfg, task=task, meta={
            "prompt_style": c.prompt_style, "shots_requested": c.shots, "shots": len(kept),
            "exemplar_ids": [e.id for e in kept], "self_consistency": c.self_consistency,
        })
        trace.messages = messages_of(prompt)
        self._emit("start", question, agent=self.kind)
        gens = (yield ModelCall(prompt, cfg, step=1))
        answers: list[str | None] = []
        strict = []
        n_in = self.policy.count_tokens(prompt)
        for i, g in enumerate(gens, 1):
            ans, repairs = parse_answer(g.text, c.format)
            answers.append(ans)
            strict.append(ans is not None and not repairs)
            trace.steps.append(Step(
                index=i, thought=g.text.strip(), raw_output=g.text, observation=None, repairs=repairs,
                error=None if ans is not None else "no answer found in the model's text",
                error_type=None if ans is not None else "no-answer",
                tokens_in=n_in if i == 1 else 0, tokens_out=g.num_tokens,
            ))
            trace.messages.append(Message(role="assistant", content=g.text))
            self._emit("sample" if len(gens) > 1 else "thought", g.text, i, answer=ans)
        winner, votes = majority_vote(answers)
        trace.answer = winner
        trace.finished = winner is not None and any(
            s and majority_vote([a])[0] == winner for s, a in zip(strict, answers, strict=True)
        )
        trace.meta["votes"] = votes
        top = max(votes.values(), default=0)
        if sum(c == top for c in votes.values()) > 1:  # a tie, reported: the first sampled of the tied won
            order = dict.fromkeys(k for k in (canonical_answer(a) for a in answers) if k is not None)
            trace.meta["tie"] = [k for k in order if votes[k] == top]
        self._emit("answer", winner or "", len(gens))
        return self._close_trace(trace, t0)
