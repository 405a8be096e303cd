"""Choosing one answer from N sampled agent runs of the same question: majority, verifier, or both.

- ``majority``: self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in
  Language Models"): the most common answer wins.
- ``verifier``: verifier reranking (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems";
  Uesato et al. 2022, "Solving math word problems with process- and outcome-based feedback"): the sample the
  verifier scores highest wins.
- ``majority+verifier``: verifier-weighted voting (Li et al. 2023, "Making Language Models Better Reasoners
  with Step-Aware Verifier", DIVERSE, §2.3): each answer group scores the sum of its samples' verifier
  probabilities, ŷ = argmax_y Σ_i 1[y_i = y] · p_i.

Answers are grouped by ``answer_key`` — the normalisation the benchmark runners judge with (numbers as
``ragloop.eval.metrics.extract_number`` reads them, claim labels as ``runners.normalize_label`` maps them, text
as SQuAD's ``normalize_answer``), so two answers the eval would judge alike vote together. A sample with no
answer (or one the normaliser cannot read) abstains: it never wins while another sample answered.

Verifier scores are reward-model logits on a Bradley-Terry scale (only differences mean anything: the model
was trained on −log σ(r⁺ − r⁻)). The probability of sample i is therefore the Plackett-Luce choice
probability p_i = softmax(r)_i over the N samples of the question — invariant to the reward model's arbitrary
offset (a sigmoid of the raw score is not). Flat scores make the weighted vote a majority vote; one sharply
preferred sample makes it the verifier's argmax.

Ties are broken deterministically, always towards the earliest sample (the lowest index, i.e. the lowest
seed): majority — among answers with the most votes, the one seen first; verifier — the first of the samples
with the top score; majority+verifier — equal weights go to the answer with more votes, then to the one
seen first. Within the winning answer group the returned trace is the first sample (majority) or the group's
highest-scoring sample (the verifier methods).

>>> sel = select_answer(["12", "11", "12.0", None], "majority", task="gsm8k")
>>> sel.index, sel.answer, sel.votes
(0, '12', {'12': 2, '11': 1})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ragloop.core.errors import UsageError
from ragloop.core.trace import Trace
from ragloop.eval.metrics import extract_number, normalize_answer

SelectMethod = Literal["majority", "verifier", "majority+verifier"]
SELECT_METHODS: tuple[str, ...] = ("majority", "verifier", "majority+verifier")


@runtime_checkable
class Verifier(Protocol):
    """Scores the sampled runs of one question; higher = more likely correct (one float per trace)."""

    name: str

    def score(self, question: str, traces: Sequence[Trace]) -> list[float]: ...


@dataclass
class RewardModelVerifier:
    """A ``Verifier`` over a reward model (anything with ``score_batch(prompts, responses) -> list[float]``,
    e.g. ``ragloop.alignment.reward.RewardModel``). ``prompt_of`` / ``response_of`` turn a trace into the
    texts the model was trained on — pass ``ragloop.alignment.data.trace_prompt_text`` /
    ``trace_response_text``, the functions ``outcome_pairs`` builds its pairs with (eval sits below
    alignment, so they are injected, not imported)."""

    model: Any
    prompt_of: Callable[[Trace], str]
    response_of: Callable[[Trace], str]
    name: str = "reward-model"

    def score(self, question: str, traces: Sequence[Trace]) -> list[float]:
        prompts = [self.prompt_of(t) or question for t in traces]
        return [float(x) for x in self.model.score_batch(prompts, [self.response_of(t) for t in traces])]


def answer_key(task: str | None, answer: str | None) -> str | None:
    """The group an answer votes in, as the runners judge it; None = no readable answer (abstains).

    ``answer_key("gsm8k", "$1,200.00") -> "1200"``, ``answer_key("claims", "Supported.") -> "SUPPORTS"``,
    ``answer_key("qa", "The Beatles") -> "beatles"``. Tasks: ``gsm8k``/``math`` (a number), ``claims``
    (a FEVER label), anything else (text, SQuAD-normalised).
    """
    if answer is None or not answer.strip():
        return None
    if task in ("gsm8k", "math"):
        x = extract_number(answer)
        if x is None:
            return None
        x = round(x, 6)  # the runners match numbers within 1e-6
        return str(int(x)) if x == int(x) else repr(x)
    if task == "claims":
        from ragloop.eval.runners import normalize_label

        return normalize_label(answer)
    return normalize_answer(answer) or None


@dataclass(frozen=True)
class Selection:
    """The outcome of a selection over N samples: which one (``index``), its answer group, and the evidence."""

    method: str
    index: int  # the chosen sample (0-based, in sample order)
    answer: str | None  # its answer group (``answer_key``); None when no sample answered
    votes: dict[str, int]  # answer group -> samples
    scores: list[float] | None = None  # verifier score of each sample (verifier methods)
    weights: dict[str, float] | None = None  # answer group -> summed probability (majority+verifier)
    tie: list[str] | None = None  # the groups that tied for first place, if any (broken as the module says)
    verifier: str | None = None

    def to_meta(self) -> dict[str, Any]:
        """JSON-friendly record for ``trace.meta["selection"]``."""
        d: dict[str, Any] = {"method": self.method, "index": self.index, "answer": self.answer, "votes": self.votes,
                             "tie": self.tie}
        if self.scores is not None:
            d["scores"] = [round(s, 6) for s in self.scores]
            d["verifier"] = self.verifier
        if self.weights is not None:
            d["weights"] = {k: round(v, 6) for k, v in self.weights.items()}
        return d


def softmax(scores: Sequence[float]) -> list[float]:
    """Numerically stable softmax: ``softmax([0.0, 0.0]) -> [0.5, 0.5]``."""
    if not scores:
        return []
    m = max(scores)
    e = [math.exp(s - m) for s in scores]
    z = sum(e)
    return [x / z for x in e]


def check_method(method: str, verifier: object | None) -> None:
    """Raise a one-line UsageError for an unknown method or a verifier method without a verifier."""
    if method not in SELECT_METHODS:
        raise UsageError(f"unknown selection {method!r}", hint="choose " + ", ".join(SELECT_METHODS))
    if method != "majority" and verifier is None:
        raise UsageError(f"--select {method} needs a verifier",
                         hint="pass --verifier DIR (a reward model from `ragloop train verifier` or `train reward`)")


def select_answer(
    answers: Sequence[str | None],
    method: str = "majority",
    *,
    task: str | None,
    scores: Sequence[float] | None = None,
    verifier_name: str | None = None,
) -> Selection:
    """Select among the answers of N samples (in sample order), given the verifier's scores for the verifier
    methods. Pure: no model is called here.

    >>> select_answer(["4", "5", "5"], "verifier", task="math", scores=[2.0, 0.0, 1.0]).index
    0
    >>> s = select_answer(["4", "5", "5"], "majority+verifier", task="math", scores=[2.0, 0.0, 1.0])
    >>> s.answer, round(s.weights["4"], 3)
    ('4', 0.665)
    """
    check_method(method, scores)
    n = len(answers)
    if n == 0:
        raise ValueError("nothing to select from: no samples")
    if scores is not None:
        if len(scores) != n:
            raise ValueError(f"{n} samples but {len(scores)} verifier scores")
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"the verifier returned a non-finite score: {list(scores)}")
    keys = [answer_key(task, a) for a in answers]
    votes: dict[str, int] = {}
    for k in keys:  # insertion order = first appearance, which the tie-breaks rely on
        if k is not None:
            votes[k] = votes.get(k, 0) + 1
    answered = [i for i, k in enumerate(keys) if k is not None]
    if not answered:
        return Selection(method, 0, None, {}, list(scores) if scores is not None else None,
                         {} if method == "majority+verifier" else None, None, verifier_name)
    first = {k: keys.index(k) for k in votes}
    if method == "majority":
        best = max(votes.values())
        tied = [k for k in votes if votes[k] == best]
        win = tied[0]  # dict order: the first seen
        return Selection(method, first[win], win, votes, tie=tied if len(tied) > 1 else None)
    assert scores is not None
    if method == "verifier":
        top = max(scores[i] for i in answered)
        tops = [i for i in answered if scores[i] == top]
        win = keys[tops[0]]
        tied_keys = list(dict.fromkeys(keys[i] for i in tops))
        return Selection(method, tops[0], win, votes, list(scores), tie=tied_keys if len(tied_keys) > 1 else None,  # type: ignore[arg-type]
                         verifier=verifier_name)
    # majority+verifier: DIVERSE weighted vote over Plackett-Luce probabilities of the answered samples
    probs = softmax([scores[i] for i in answered])
    weights: dict[str, float] = dict.fromkeys(votes, 0.0)
    for i, p in zip(answered, probs, strict=True):
        weights[keys[i]] += p  # type: ignore[index]
    order = sorted(votes, key=lambda k: (-weights[k], -votes[k], first[k]))
    win = order[0]
    tied = [k for k in order if weights[k] == weights[win]]
    members = [i for i in answered if keys[i] == win]
    index = max(members, key=lambda i: (scores[i], -i))  # the group's best-scored sample, earliest on ties
    return Selection(method, index, win, votes, list(scores), weights, tied if len(tied) > 1 else None, verifier_name)


def select_trace(
    traces: Sequence[Trace],
    method: str = "majority",
    *,
    task: str | None,
    verifier: Verifier | None = None,
    question: str | None = None,
) -> tuple[Trace, Selection]:
    """Select one of the N sampled traces of one question; returns a copy of the chosen trace whose
    ``meta["selection"]`` records the method, the votes, the verifier's scores and any tie."""
    check_method(method, verifier)
    if not traces:
        raise ValueError("nothing to select from: no traces")
    q = question if question is not None else traces[0].question
    scores = verifier.score(q, traces) if (verifier is not None and method != "majority") else None
    sel = select_answer([t.answer for t in traces], method, task=task, scores=scores,
                        verifier_name=getattr(verifier, "name", None) if scores is not None else None)
    chosen = traces[sel.index].model_copy(deep=True)
    chosen.meta["selection"] = {**sel.to_meta(), "n": len(traces)}
    return chosen, sel


def compare_methods(
    answers: Sequence[str | None],
    *,
    task: str | None,
    scores: Sequence[float] | None = None,
    verifier_name: str | None = None,
) -> dict[str, Selection]:
    """Every method's selection over the same samples (only majority without scores): one sampling run
    measures majority@N, verifier@N and majority+verifier@N on identical samples."""
    methods = SELECT_METHODS if scores is not None else ("majority",)
    return {m: select_answer(answers, m, task=task, scores=scores, verifier_name=verifier_name) for m in methods}
