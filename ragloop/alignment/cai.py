"""Constitutional AI over agent traces: critique → revision (SL-CAI data) and AI preference labels (RLAIF).

Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback": a model critiques a response under a
written principle, revises it, and the revisions become supervised data (SL-CAI); a judge model compares two
responses under a principle, and its choices become preference pairs for the reward model (RL-CAI, also
called RLAIF; Lee et al. 2023). The constitution here is our own wording (``constitution.json`` in this
package); the paper's prompts in ``../shared/data/constitutional_ai`` are only a format reference.

- ``revise_traces``: for each trace, critique the model's response under each selected principle, then
  revise it; a changed, non-empty revision becomes an SFT row (the original prompt, the revised response
  as the trainable assistant turn) and the critique is recorded on the trace (``feedback.critiques``).
- ``judge_pair`` / ``label_traces``: the judge reads the principle's preference question with options (A)
  and (B) and we compare the log-probabilities of answering "A" and "B" (as the paper does, rather than
  parsing free text). Small models prefer a position, so each pair is judged in both orders and the two
  margins are averaged (position debiasing, Zheng et al. 2023). Where both traces carry ground truth
  (``feedback.correct`` differs), the judge's agreement with it is reported.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ragloop.alignment.data import PreferencePair, SFTRow, trace_prompt_text, trace_response_text
from ragloop.core.errors import ConfigError, DataError
from ragloop.core.trace import Message, Trace
from ragloop.models.types import GenerationConfig

log = logging.getLogger(__name__)


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    applies_to: list[str]
    critique: str
    revision: str
    preference: str


def load_constitution(ids: Sequence[str] | None = None, path: str | Path | None = None) -> list[Principle]:
    """The constitution's principles (all, or those named in ``ids``, in that order)."""
    if path is None:
        text = resources.files("ragloop.alignment").joinpath("constitution.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        principles = [Principle.model_validate(p) for p in data["principles"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"the constitution is not valid: {e}") from None
    if ids is None:
        return principles
    by_id = {p.id: p for p in principles}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ConfigError(f"unknown principle(s): {', '.join(unknown)}; known: {', '.join(by_id)}")
    return [by_id[i] for i in ids]


def default_principle(trace: Trace, principles: Sequence[Principle]) -> Principle:
    """The first principle that applies to the trace's agent or task (else the first one)."""
    tags = {trace.agent, trace.task or ""}
    for p in principles:
        if tags & set(p.applies_to):
            return p
    return principles[0]


# --------------------------------------------------------------------------------------- prompts


def critique_messages(prompt: str, response: str, principle: Principle) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You review an AI assistant's response carefully and point out problems."},
        {"role": "user", "content": f"Conversation:\n{prompt}\n\nAssistant's response:\n{response}\n\n"
                                    f"Critique request: {principle.critique}"},
    ]


def revision_messages(prompt: str, response: str, critique: str, principle: Principle) -> list[dict[str, str]]:
    return critique_messages(prompt, response, principle) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": f"Revision request: {principle.revision}\nWrite only the revised response."},
    ]


def judge_messages(prompt: str, first: str, second: str, principle: Principle) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You compare two responses and pick the better one."},
        {"role": "user", "content": f"Conversation:\n{prompt}\n\n{principle.preference}\n\n"
                                    f"(A) {first}\n\n(B) {second}\n\nAnswer with A or B."},
    ]


# --------------------------------------------------------------------------------------- revision


@dataclass
class RevisionResult:
    read: int
    revised: int
    unchanged: int
    rows: list[SFTRow]


def critique_and_revise(policy: Any, prompt: str, response: str, principle: Principle, *, max_new_tokens: int = 192,
                        seed: int = 0) -> tuple[str, str]:
    """(critique, revision) of one response under one principle, by greedy decoding."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, greedy=True, seed=seed)
    critique = policy.generate(critique_messages(prompt, response, principle), cfg)[0].text.strip()
    revision = policy.generate(revision_messages(prompt, response, critique, principle), cfg)[0].text.strip()
    return critique, revision


def revise_traces(policy: Any, traces: Sequence[Trace], principles: Sequence[Principle], *,
                  out_path: str | Path | None = None, max_new_tokens: int = 192, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> RevisionResult:
    """SL-CAI data from traces: each trace's response critiqued and revised under the principles that apply
    to it (all given ones when none applies); writes SFT rows (JSONL) to ``out_path``. ``progress(done, total)``
    is called after each trace."""
    if not principles:
        raise ConfigError("no principles selected")
    rows: list[SFTRow] = []
    revised = unchanged = 0
    for i, t in enumerate(traces):
        if progress is not None:
            progress(i, len(traces))
        prompt, response = trace_prompt_text(t), trace_response_text(t)
        if not response:
            unchanged += 1
            continue
        applicable = [p for p in principles if {t.agent, t.task or ""} & set(p.applies_to)] or list(principles)
        current = response
        for p in applicable:
            crit, rev = critique_and_revise(policy, prompt, current, p, max_new_tokens=max_new_tokens, seed=seed)
            t.feedback.critiques.append({"principle": p.id, "critique": crit, "revision": rev, "by": policy.name})
            if rev:
                current = rev
        if current.strip() and current.strip() != response.strip():
            context = [m for m in t.messages if m.role != "assistant"][:2] or [Message(role="user", content=prompt)]
            msgs = [Message(role=m.role, content=m.content, trainable=False) for m in context]
            msgs.append(Message(role="assistant", content=current))
            template = "raw" if t.meta.get("prompt_style") == "raw" else "chat"
            rows.append(SFTRow(messages=msgs, source=f"cai:{t.id}", template=template))
            revised += 1
        else:
            unchanged += 1
    if progress is not None:
        progress(len(traces), len(traces))
    if out_path is not None:
        _write_jsonl(out_path, [r.model_dump() for r in rows])
    return RevisionResult(read=len(traces), revised=revised, unchanged=unchanged, rows=rows)


# ------------------------------------------------------------------------------------------ RLAIF


@dataclass
class Judgement:
    margin: float  # > 0: the first response is preferred (mean log-prob gap over both orders)
    margin_ab: float  # first shown as (A)
    margin_ba: float  # first shown as (B)


def judge_pair(judge: Any, prompt: str, first: str, second: str, principle: Principle) -> Judgement:
    """Compare log p("A") and log p("B") as the judge's answer, in both orders."""

    def gap(a: str, b: str) -> float:
        msgs = judge_messages(prompt, a, b, principle)
        return sum(judge.score(msgs, "A")) - sum(judge.score(msgs, "B"))

    ab = gap(first, second)  # > 0 favours `first`
    ba = -gap(second, first)  # first is now (B): log p(B) − log p(A) favours `first`
    return Judgement(margin=(ab + ba) / 2, margin_ab=ab, margin_ba=ba)


@dataclass
class LabelResult:
    labelled: int
    undecided: int
    pairs: list[PreferencePair]
    agreement: float  # with ground truth, over pairs that have it
    n_with_truth: int


def label_traces(judge: Any, traces: Sequence[Trace], *, out_path: str | Path | None = None,
                 principle_id: str | None = None, max_pairs: int = 200, min_margin: float = 0.0,
                 seed: int = 0, progress: Callable[[int, int], None] | None = None) -> LabelResult:
    """RLAIF pairs: responses to the same question compared by ``judge`` under a principle (the given one,
    else the trace's default). Pairs whose |margin| ≤ ``min_margin`` are left undecided. ``progress(done,
    total)`` is called after each pair."""
    principles = load_constitution()
    fixed = load_constitution([principle_id])[0] if principle_id else None
    by_q: dict[str, list[Trace]] = defaultdict(list)
    for t in traces:
        if trace_response_text(t):
            by_q[t.question].append(t)
    candidates = []
    for group in by_q.values():
        uniq = list({trace_response_text(t): t for t in group}.values())
        candidates += list(itertools.combinations(uniq, 2))
    if not candidates:
        raise DataError("no question has two different responses to compare",
                        hint="collect several samples per question (e.g. improve's collect stage)")
    random.Random(seed).shuffle(candidates)
    pairs: list[PreferencePair] = []
    rows: list[dict[str, Any]] = []
    undecided = agree = with_truth = 0
    todo = candidates[:max_pairs]
    for i, (a, b) in enumerate(todo):
        if progress is not None:
            progress(i, len(todo))
        p = fixed or default_principle(a, principles)
        prompt = trace_prompt_text(a)
        ra, rb = trace_response_text(a), trace_response_text(b)
        j = judge_pair(judge, prompt, ra, rb, p)
        if abs(j.margin) <= min_margin:
            undecided += 1
            continue
        chosen, rejected = (ra, rb) if j.margin > 0 else (rb, ra)
        pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected))
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "principle": p.id,
               "judge": judge.name, "margin": j.margin, "margin_ab": j.margin_ab, "margin_ba": j.margin_ba}
        ca, cb = a.feedback.correct, b.feedback.correct
        if ca is not None and cb is not None and ca != cb:
            with_truth += 1
            ok = (j.margin > 0) == bool(ca)
            agree += ok
            row["agrees_with_truth"] = ok
        rows.append(row)
    if progress is not None:
        progress(len(todo), len(todo))
    if out_path is not None:
        _write_jsonl(out_path, rows)
    return LabelResult(labelled=len(pairs), undecided=undecided, pairs=pairs,
                       agreement=agree / with_truth if with_truth else float("nan"), n_with_truth=with_truth)


def _write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
