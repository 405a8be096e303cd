"""Groundedness: is an answer's content supported by the passages it was given (or cites)?

The measure is K-Precision (Adlakha et al. 2024, "Evaluating Correctness and Faithfulness of
Instruction-Following Models for Question Answering", TACL): the share of the answer's tokens that occur in
the knowledge passages. They found this lexical measure to agree with human faithfulness judgements about
as well as GPT-4-based judges, and far better than model-based NLI metrics — and it needs no extra model,
which matters on a laptop CPU. Here tokens are lower-cased words without stopwords, citation markers and
the claim-verification labels (content words only, so "The answer is" does not count as support).

Per answer: ``k_precision`` in [0, 1], and *grounded* when ``k_precision >= threshold`` (0.5 by default:
most of what the answer says is in the passages). The passages are those the answer cites (``[n]``) when
it cites any, else every passage the agent retrieved (``Trace.sources``), else the observations of the
steps that retrieved something (ReAct). What is measured:

- ``rag``: the model's own text (verdict and evidence sentence for claims);
- ``react``: the final answer, or — when it is only a label such as SUPPORTS — the thought that led to it;
- agents that retrieved nothing (CoT, PAL, a fallback that ignored the documents) are not measured.

It is a lower bar than entailment: copying passage words in a wrong order scores high. It catches the
failure the issue reported — an answer ("bluefin") that appears nowhere in what was retrieved.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragloop.core.trace import Trace

# a small English function-word list (the NLTK/Snowball core); content words are what remains
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves also answer passage passages according
says say said document documents evidence claim verdict therefore thus yes
""".split())
_LABEL_WORDS = frozenset({"supports", "support", "supported", "refutes", "refute", "refuted", "enough", "info",
                          "not"})
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:[.,][0-9]+)*")
_CITE_RE = re.compile(r"\[\d{1,2}\]")
_OBS_RE = re.compile(r"^Observation \d+:\s*")


def content_tokens(text: str) -> list[str]:
    """``content_tokens("The server uses port 8443 [1].") -> ['server', 'uses', 'port', '8443']``"""
    text = _CITE_RE.sub(" ", text or "")
    return [t for t in (m.group().lower() for m in _TOKEN_RE.finditer(text))
            if t not in STOPWORDS and t not in _LABEL_WORDS and (len(t) > 1 or t.isdigit())]


def k_precision(answer: str, passages: Sequence[str]) -> float | None:
    """Share of the answer's content tokens found in the passages; None when the answer has none.

    ``k_precision("port 8443", ["It listens on port 8443."]) -> 1.0``; ``k_precision("bluefin", ["port 8443"]) -> 0.0``
    """
    toks = content_tokens(answer)
    if not toks:
        return None
    vocab = {t for p in passages for t in content_tokens(p)}
    return sum(t in vocab for t in toks) / len(toks)


@dataclass(frozen=True)
class GroundednessScore:
    k_precision: float
    grounded: bool
    cites: bool  # the answer cites at least one passage


def measured_text(trace: Trace) -> str | None:
    """The text whose grounding is measured (see the module docstring), or None for agents that retrieved nothing."""
    if trace.agent == "rag":
        return str(trace.meta.get("answer_text") or trace.answer or "")
    if trace.agent == "react" and trace.fallback is None:
        if trace.answer and content_tokens(trace.answer):
            return trace.answer
        thoughts = [s.thought for s in trace.steps if s.thought]
        return thoughts[-1] if thoughts else trace.answer
    return None


def grounding_passages(trace: Trace) -> tuple[list[str], bool]:
    """The passages to check against and whether they are the cited ones."""
    cited = [s.text for s in trace.sources if s.cited and s.text]
    if cited:
        return cited, True
    if any(s.text for s in trace.sources):
        return [s.text for s in trace.sources if s.text], False
    return [_OBS_RE.sub("", s.observation or "") for s in trace.steps if s.retrieved_ids and s.observation], False


def trace_groundedness(trace: Trace, *, threshold: float = 0.5) -> GroundednessScore | None:
    """The groundedness of one trace's answer, or None when there is nothing to measure."""
    text = measured_text(trace)
    if not text:
        return None
    passages, cites = grounding_passages(trace)
    if not passages:
        return None
    kp = k_precision(text, passages)
    if kp is None:
        return None
    return GroundednessScore(kp, kp >= threshold, cites)


def summarize_groundedness(traces: Sequence[Trace], *, threshold: float = 0.5) -> dict[str, Any]:
    """``{"grounded": share, "k_precision": mean, "cited": share citing, "measured": n, "threshold": t}``
    over the traces that can be measured (``measured`` may be smaller than the number of traces)."""
    scores = [s for s in (trace_groundedness(t, threshold=threshold) for t in traces) if s is not None]
    n = len(scores)
    if not n:
        return {"grounded": None, "k_precision": None, "cited": None, "measured": 0, "threshold": threshold}
    return {"grounded": round(sum(s.grounded for s in scores) / n, 4),
            "k_precision": round(sum(s.k_precision for s in scores) / n, 4),
            "cited": round(sum(s.cites for s in scores) / n, 4), "measured": n, "threshold": threshold}
