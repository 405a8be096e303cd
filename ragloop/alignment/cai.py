"""Constitutional AI over agent traces: critique → revision (SL-CAI data) and AI preference labels (RLAIF).

Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback": a model critiques a response under a
written principle, revises it, and the revisions become supervised data (SL-CAI); a judge model compares two
responses under a principle, and its choices become preference pairs for the reward model (RL-CAI, also
called RLAIF; Lee et al. 2023). The constitution here is our own wording (``constitution.json`` in this
package); the paper's prompts in ``../shared/data/constitutional_ai`` are only a format reference.

- ``revise_traces``: for each trace, critique the model's response under each selected principle, then
  revise it; a changed, non-empty revision becomes an SFT row (the original prompt, the revised response
  as the trainable assistant turn) and the critique is recorded on the trace (``feedback.critiques``).
- ``check_revision``: a revision becomes training data only if it passes three checks, each a small pure
  function tested on literal inputs: it still parses and answers in the agent's format (PAL: the program
  extracts and runs in the sandbox and returns a value; ReAct: its last action parses; CoT: "The answer
  is N" is there), it keeps the facts (it invents no number or identifier-like token — ``8443``,
  ``HTTP_PROXY``, ``v2.1`` — absent from the prompt, the evidence and the original response, and drops no
  such token of the original answer), and it is not degenerate (a repeated sentence or a high share of
  repeated word 4-grams; the repetition measures of Holtzman et al. 2020 / Welleck et al. 2020). Rejections
  are counted by reason in ``RevisionResult.rejected``.
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
import re
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ragloop.alignment.data import (
    PreferencePair,
    SFTRow,
    program_body,
    trace_prompt_text,
    trace_response_text,
)
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
    revised: int  # revisions kept as SFT rows (they passed every check)
    unchanged: int
    rows: list[SFTRow]
    rejected: Counter = field(default_factory=Counter)  # revisions that failed a check, by reason

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


# ------------------------------------------------------------------------------------ revision checks

# a fact: a number (``8443``, ``3.5``, ``1,000``) or an identifier-like token (``HTTP_PROXY``, ``v2.1``,
# ``eth0``, ``gpt-4``): a word with an underscore, or with letters and digits mixed
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")
_WORD_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*[A-Za-z0-9_]")
# small integers and round units are how any rewording counts and converts ("two steps", "100%", "60 min");
# a revision may introduce them without inventing a fact
_COMMON_NUMBERS = {str(i) for i in range(13)} | {"100", "1000", "60", "24", "7", "365"}


def _number_key(tok: str) -> str:
    t = tok.replace(",", "")
    try:
        v = float(t)
    except ValueError:
        return t
    return str(int(v)) if v == int(v) else repr(v)


def fact_tokens(text: str, *, identifiers: bool = True) -> set[str]:
    """The numbers (normalised) and identifier-like tokens of ``text``:
    ``fact_tokens("Use port 8443 and HTTP_PROXY, about 1,000 calls") -> {"8443", "HTTP_PROXY", "1000"}``."""
    out = {_number_key(m.group(0)) for m in _NUMBER_RE.finditer(text)}
    if identifiers:
        out |= {w for w in _WORD_RE.findall(text)
                if "_" in w or (any(c.isalpha() for c in w) and any(c.isdigit() for c in w))}
    return out


def invented_facts(revision: str, sources: Sequence[str], *, identifiers: bool = True) -> set[str]:
    """Facts in ``revision`` that none of ``sources`` (prompt, evidence, original response) contains:
    ``invented_facts("the port is 1080", ["use port 8443"]) -> {"1080"}``."""
    known: set[str] = set()
    for src in sources:
        known |= fact_tokens(src, identifiers=identifiers)
    return {f for f in fact_tokens(revision, identifiers=identifiers) if f not in known and f not in _COMMON_NUMBERS}


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one (0 = none repeats):
    ``repetition_ratio("a b c d a b c d", 4) -> 0.2`` (≈; 1 of the 5 4-grams is a repeat)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_degenerate(text: str, *, max_repeat_ratio: float = 0.5, max_same_sentence: int = 3) -> bool:
    """A looping text: one sentence (or line) written ``max_same_sentence`` times or more, or more than
    ``max_repeat_ratio`` of its word 4-grams repeated. ``is_degenerate("I will fix it. " * 4) -> True``."""
    parts = [" ".join(p.split()).lower() for p in re.split(r"(?<=[.!?])\s+|\n+", text)]
    counts = Counter(p for p in parts if len(p) >= 8)
    if counts and counts.most_common(1)[0][1] >= max_same_sentence:
        return True
    return repetition_ratio(text) > max_repeat_ratio


def _pal_prefill(trace: Trace) -> str:
    """The ``def solution():`` + docstring a raw PAL prompt ends with ('' if it does not)."""
    ctx = trace_prompt_text(trace)
    i = ctx.rfind("def solution():")
    return ctx[i:] if i >= 0 and ctx.rstrip().endswith('"""') else ""


def pal_continuation(revision: str) -> str | None:
    """A PAL revision as the continuation of a raw prompt that ends with ``def solution():`` + docstring — the
    shape the model writes and trains on. The reviser's text comes back stripped, so its first line lost its
    indentation; a whole program is cut to its body::

        pal_continuation("x = 2\n    return x") -> "\n    x = 2\n    return x\n"
    """
    from ragloop.agents.pal import extract_program

    if "def solution" in revision:
        program, _ = extract_program(revision)
        if program is None:
            return None
        try:
            return "\n" + program_body(program).rstrip() + "\n"
        except (DataError, SyntaxError):
            return None
    lines = revision.strip("\n").splitlines()
    if not lines:
        return None
    body = lines[0].strip() + "\n" + textwrap.dedent("\n".join(lines[1:]))
    return "\n" + textwrap.indent(body.rstrip(), "    ") + "\n"


def revision_format_error(trace: Trace, revision: str, *, sandbox: Any = None) -> str | None:
    """Why ``revision`` no longer works in the trace's agent format (None if it does).

    PAL: a ``def solution():`` program extracts (after the prompt's prefill when the revision is a body)
    and runs in ``sandbox`` to a value; when the trace was judged correct the value must equal its answer.
    ReAct: the last ``Action`` line parses against the trace's tools. CoT: "The answer is N" is written.
    Returns one of ``no_program``, ``program_fails``, ``answer_changed``, ``action_unparsable``,
    ``no_answer``."""
    if trace.agent == "pal":
        from ragloop.agents.pal import extract_program, format_value, join_prefill

        program, _ = extract_program(revision)
        prefill = _pal_prefill(trace)
        if program is None and prefill:
            program, _ = extract_program(join_prefill(prefill, revision)[0])
        if program is None:
            return "no_program"
        if sandbox is None:
            return None
        res = sandbox.run(program, entry="solution")
        value = format_value(res.value) if res.ok else None
        if value is None:
            return "program_fails"
        if trace.feedback.correct is True and trace.answer is not None and value != trace.answer:
            return "answer_changed"
        return None
    if trace.agent == "react":
        from ragloop.agents.parsing import parse_json_step, parse_react_text

        tools = list(trace.meta.get("tools") or ["Search", "Lookup", "Finish"])
        if trace.meta.get("action_format") == "json":
            calls = list(re.finditer(r'\{\s*"tool"', revision))
            ok = bool(calls) and parse_json_step(revision[calls[-1].start():], tools=tools).ok
        else:
            starts = [m.start() for m in re.finditer(r"^[ \t]*Thought\b", revision, re.I | re.M)]
            last = revision[starts[-1]:] if starts else revision
            last = re.sub(r"^\s*Thought[ \t]*\d*[ \t]*:\s*", "", last, flags=re.I)
            ok = bool(re.search(r"^[ \t]*Action", last, re.I | re.M)) and parse_react_text(
                last, step=1, tools=tools).ok
        return None if ok else "action_unparsable"
    if trace.agent == "cot":
        from ragloop.agents.cot import FEVER_FORMAT, GSM8K_FORMAT, QA_FORMAT

        if not any(re.search(f.answer_regex, revision, re.I | re.M) for f in (GSM8K_FORMAT, FEVER_FORMAT, QA_FORMAT)):
            return "no_answer"
    return None


def check_revision(trace: Trace, original: str, revision: str, *, sandbox: Any = None) -> str | None:
    """None when ``revision`` of ``original`` (the trace's response) may become training data, else the reason
    it may not: ``degenerate``, a format reason of ``revision_format_error``, ``invented_fact`` (a number or
    identifier the prompt, the evidence and the original do not contain) or ``dropped_fact`` (a number or
    identifier of the original answer missing from the revision). Programs (PAL) are checked on numbers only:
    renaming a variable is no new fact."""
    if is_degenerate(revision):
        return "degenerate"
    why = revision_format_error(trace, revision, sandbox=sandbox)
    if why is not None:
        return why
    code = trace.agent == "pal"
    evidence = [m.content for m in trace.messages] + [s.observation or "" for s in trace.steps]
    if invented_facts(revision, [*evidence, original, trace.question], identifiers=not code):
        return "invented_fact"
    own = "\n".join(ln for ln in revision.splitlines() if not re.match(r"\s*Observation\b", ln, re.I))
    if not code and trace.answer and fact_tokens(trace.answer) - fact_tokens(own):  # the model's own words
        return "dropped_fact"
    return None


def critique_and_revise(policy: Any, prompt: str, response: str, principle: Principle, *, max_new_tokens: int = 192,
                        seed: int = 0) -> tuple[str, str]:
    """(critique, revision) of one response under one principle, by greedy decoding."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, greedy=True, seed=seed)
    critique = policy.generate(critique_messages(prompt, response, principle), cfg)[0].text.strip()
    revision = policy.generate(revision_messages(prompt, response, critique, principle), cfg)[0].text.strip()
    return critique, revision


def revise_traces(policy: Any, traces: Sequence[Trace], principles: Sequence[Principle], *,
                  out_path: str | Path | None = None, max_new_tokens: int = 192, seed: int = 0,
                  sandbox: Any = None, progress: Callable[[int, int], None] | None = None) -> RevisionResult:
    """SL-CAI data from traces: each trace's response critiqued and revised under the principles that apply
    to it (all given ones when none applies); a revision that passes ``check_revision`` becomes an SFT row,
    written (JSONL) to ``out_path``; the others are counted by reason in ``rejected`` and recorded on the
    trace's last critique. PAL revisions run in ``sandbox`` (default: a new Sandbox). ``progress(done,
    total)`` is called after each trace."""
    if not principles:
        raise ConfigError("no principles selected")
    if sandbox is None and any(t.agent == "pal" for t in traces):
        from ragloop.agents.sandbox.host import Sandbox

        sandbox = Sandbox()
    rows: list[SFTRow] = []
    revised = unchanged = 0
    rejected: Counter = Counter()
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
        if t.agent == "pal" and _pal_prefill(t) and current.strip() != response.strip():
            current = pal_continuation(current) or current  # the raw prompt's continuation, indented
        if current.strip() and current.strip() != response.strip():
            why = check_revision(t, response, current, sandbox=sandbox)
            if why is not None:
                rejected[why] += 1
                if t.feedback.critiques:
                    t.feedback.critiques[-1]["rejected"] = why
                log.info("revision of trace %s rejected: %s", t.id, why)
                continue
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
    return RevisionResult(read=len(traces), revised=revised, unchanged=unchanged, rows=rows, rejected=rejected)


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
