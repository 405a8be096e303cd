"""Retrieve-then-answer with citations: the plain RAG agent, and the sources every retrieving agent shows.

``RAGAgent`` is retrieval-augmented generation in its simplest form (Lewis et al. 2020, "Retrieval-Augmented
Generation for Knowledge-Intensive NLP Tasks"; the prompt-level variant of Ram et al. 2023, "In-Context
Retrieval-Augmented Language Models"): search the index once with the question, put the top ``k`` passages
in the prompt numbered ``[1] .. [k]``, and ask the model to answer from them only and cite what it used.
A small model does one thing per call here, which it does far more reliably than a multi-step ReAct loop.

Every run records its passages as ``Trace.sources`` (file, page/section/lines, chunk id, score, text, and
whether the answer cites it). ``attach_sources`` does the same after the fact for an agent that retrieved
through tools (ReAct's Search/Lookup record chunk ids in ``Step.retrieved_ids``). ``render_sources`` is the
block printed under an answer by ``ragloop ask``, the REPL and the demo.

Fallback (stated in the Trace and the output, never silent): when the model writes nothing usable, the
answer is the sentence of the best passage that shares most words with the question, marked
``fallback="extractive"``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ragloop.agents.base import AgentBase, EventHandler, messages_of, with_changes
from ragloop.agents.docsearch import split_sentences
from ragloop.agents.runtime import EpisodeGen, ModelCall
from ragloop.agents.safety import escape_display, injection_flags, neutralize_control
from ragloop.core.errors import UsageError
from ragloop.core.trace import Message, Source, Step, ToolCall, Trace
from ragloop.models.types import GenerationConfig, Policy

QA_SYSTEM = (
    "You answer questions using only the numbered passages you are given. After each fact, cite the passage "
    "it comes from as [1], [2], ... If the passages do not contain the answer, say: The documents do not say."
)
CLAIMS_SYSTEM = (
    "You check a claim against the numbered passages you are given. Start your reply with one verdict: "
    "SUPPORTS, REFUTES or NOT ENOUGH INFO. Then give one sentence of evidence from the passages and cite it "
    "as [1], [2], ..."
)
CLAIM_LABELS = ("NOT ENOUGH INFO", "SUPPORTS", "REFUTES")
_LABEL_RE = re.compile(r"\b(NOT ENOUGH INFO|SUPPORTS?|REFUTES?|SUPPORTED|REFUTED|CONTRADICTS?)\b", re.IGNORECASE)
_CITE_RE = re.compile(r"\[(\d{1,2})\]")
_WORD_RE = re.compile(r"\w+")
_ABBREV_END = re.compile(r"\b(?:al|e\.g|i\.e|cf|vs|etc|Fig|Eq|Sec|Dr|Mr|Ms|No)\.$")


@dataclass
class RAGConfig:
    """Settings of a retrieve-then-answer run."""

    k: int = 3  # passages in the prompt
    mode: str = "hybrid"  # retriever search mode: dense | bm25 | hybrid
    passage_chars: int = 600  # each passage is cut here (the cut is stated in the passage)
    max_new_tokens: int = 160
    task: Literal["qa", "claims"] = "qa"
    seed: int = 0
    decoding: GenerationConfig | None = None  # default: greedy

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 20:
            raise UsageError(f"the RAG agent takes 1..20 passages, got k={self.k}")
        if self.passage_chars < 50:
            raise UsageError(f"passage_chars must be >= 50, got {self.passage_chars}")
        if self.task not in ("qa", "claims"):
            raise UsageError(f"the RAG agent answers qa or claims tasks, not {self.task!r}",
                             hint="use --agent pal or cot for math")


def location_of(metadata: dict[str, Any]) -> str:
    """Where a chunk sits in its file. ``location_of({"page": 3}) -> "page 3"``;
    ``location_of({"section": "Install", "line_start": 4, "line_end": 9}) -> 'section "Install", lines 4-9'``."""
    parts = []
    if "page" in metadata:
        parts.append(f"page {metadata['page']}")
    if metadata.get("section"):
        parts.append(f'section "{metadata["section"]}"')
    if "line_start" in metadata:
        end = metadata.get("line_end", metadata["line_start"])
        parts.append(f"lines {metadata['line_start']}-{end}" if end != metadata["line_start"]
                     else f"line {metadata['line_start']}")
    elif "row" in metadata:
        parts.append(f"row {metadata['row']}")
    elif "record" in metadata:
        parts.append(f"record {metadata['record']}")
    return ", ".join(parts)


def source_of_hit(n: int, hit: Any) -> Source:
    """A ``Source`` from a ``ragloop.retrieval.Hit`` (or anything with the same attributes)."""
    meta = dict(getattr(hit, "metadata", {}) or {})
    score = getattr(hit, "score", None)
    return Source(n=n, chunk_id=str(hit.chunk_id), doc_id=str(getattr(hit, "doc_id", "")),
                  source=str(getattr(hit, "source", "") or meta.get("source", "")),
                  title=str(getattr(hit, "title", "") or ""), location=location_of(meta),
                  score=None if score is None else round(float(score), 4), text=str(getattr(hit, "text", "")))


def cited_numbers(text: str) -> list[int]:
    """The passage numbers an answer cites, in order, once each. ``cited_numbers("a [2], b [1][2]") -> [2, 1]``."""
    return list(dict.fromkeys(int(m) for m in _CITE_RE.findall(text or "")))


def mark_cited(sources: Sequence[Source], text: str) -> None:
    cited = set(cited_numbers(text))
    for s in sources:
        s.cited = s.n in cited


def attach_sources(trace: Trace, retriever: Any) -> Trace:
    """Fill ``trace.sources`` from the chunk ids its steps retrieved (ReAct's Search and Lookup), in the order
    first seen, when the agent did not record them itself. Ids the index no longer knows are skipped."""
    if trace.sources or retriever is None:
        return trace
    seen: dict[str, None] = {}
    for step in trace.steps:
        for cid in step.retrieved_ids:
            seen.setdefault(cid, None)
    sources: list[Source] = []
    for cid in seen:
        hit = retriever.get(cid) if hasattr(retriever, "get") else None
        if hit is not None:
            sources.append(source_of_hit(len(sources) + 1, hit))
            continue
        doc = retriever.document(cid) if hasattr(retriever, "document") else None
        if doc is not None:  # Lookup records the document id
            sources.append(Source(n=len(sources) + 1, chunk_id=cid, doc_id=cid, source=str(doc.source),
                                  title=str(doc.title), location="(whole document)"))
    trace.sources = sources
    mark_cited(trace.sources, trace.answer or "")
    return trace


def render_sources(trace: Trace, *, max_chars: int = 0) -> str:
    """The lines printed under an answer: ``[1] notes/x.md (section "Install") · chunk abc · cited``.
    ``max_chars > 0`` adds that much of each passage's text. Empty when the agent retrieved nothing."""
    if not trace.sources:
        return ""
    lines = ["Sources:"]
    for s in trace.sources:
        where = f" ({s.location})" if s.location else ""
        title = f" — {s.title}" if s.title and s.title not in s.source else ""
        mark = " · cited" if s.cited else ""
        # file names are untrusted: a newline or bidi override in one must not break or reorder the line
        name, title = escape_display(s.source or s.doc_id), escape_display(title)
        lines.append(f"  [{s.n}] {name}{where}{title} · chunk {s.chunk_id}{mark}")
        text = s.text
        if max_chars > 0 and text:
            t = " ".join(text.split())
            lines.append("      " + (t[:max_chars] + " …" if len(t) > max_chars else t))
    if trace.answer and trace.agent == "rag" and not any(s.cited for s in trace.sources):
        lines.append("  (the answer cites none of these passages: check it against them)")
    return "\n".join(lines)


def parse_claim_label(text: str) -> str | None:
    """The first verdict in the text, as a FEVER label. ``parse_claim_label("Refuted, because") -> "REFUTES"``."""
    m = _LABEL_RE.search(text or "")
    if not m:
        return None
    w = m.group(1).upper()
    if w.startswith("NOT"):
        return "NOT ENOUGH INFO"
    return "SUPPORTS" if w.startswith("SUPPORT") else "REFUTES"


def best_sentence(question: str, passage: str) -> str:
    """The sentence of ``passage`` sharing most words with ``question`` (ties: the earlier one)."""
    q = {w.lower() for w in _WORD_RE.findall(question) if len(w) > 2}
    sents: list[str] = []
    for s in split_sentences(passage) or [passage.strip()]:
        if sents and _ABBREV_END.search(sents[-1]):  # "Holtzman et al. (2020) ..." is one sentence
            sents[-1] = f"{sents[-1]} {s}"
        else:
            sents.append(s)
    return max(sents, key=lambda s: (len(q & {w.lower() for w in _WORD_RE.findall(s)}), -sents.index(s)))


class RAGAgent(AgentBase):
    """Retrieve the top passages, answer from them, cite them: ``RAGAgent(policy, retriever).run(q) -> Trace``."""

    concurrent_safe = True  # no per-run state on the agent: one instance may run many episodes at once

    kind = "rag"

    def __init__(self, policy: Policy, retriever: Any, config: RAGConfig | None = None, *,
                 on_event: EventHandler | None = None) -> None:
        super().__init__(policy, on_event=on_event)
        if retriever is None:
            raise UsageError("the RAG agent needs an index to search", hint="pass --index PATH_OR_NAME")
        self.retriever = retriever
        self.config = config or RAGConfig()

    def _decoding(self) -> GenerationConfig:
        c = self.config
        base = c.decoding or GenerationConfig(max_new_tokens=c.max_new_tokens, greedy=True, temperature=0.0,
                                              seed=c.seed)
        # A passage number past the last one given means the model has started writing passages of its own
        # (the 135M model copies the list's format); a new Question/Passages block means it left the answer.
        stops = [f"[{c.k + 1}]", "\nQuestion:", "\nPassages:"]
        return with_changes(base, stop=list(dict.fromkeys([*base.stop, *stops])))

    def _passages(self, sources: Sequence[Source]) -> str:
        out = []
        for s in sources:
            # passages are untrusted (SECURITY.md §4): no control characters or chat-template tokens reach the prompt
            text = " ".join(neutralize_control(s.text, keep_newlines=False).split())
            text = text.replace("<|", "< |").replace("|>", "| >")
            if len(text) > self.config.passage_chars:
                text = text[: self.config.passage_chars].rstrip() + " … [cut]"
            head = f"({s.title}) " if s.title else ""
            out.append(f"[{s.n}] {head}{text}")
        return "\n".join(out)

    def build_prompt(self, question: str, sources: Sequence[Source]) -> list[dict[str, str]]:
        claims = self.config.task == "claims"
        ask = (f"Claim: {question}\nVerdict (SUPPORTS, REFUTES or NOT ENOUGH INFO), then the evidence with its "
               "citation:" if claims else f"Question: {question}\nAnswer in one or two sentences and cite the "
               "passages you use, like [1].")
        return [{"role": "system", "content": CLAIMS_SYSTEM if claims else QA_SYSTEM},
                {"role": "user", "content": f"Passages:\n{self._passages(sources)}\n\n{ask}"}]

    def episode(self, question: str, *, task: str | None = None) -> EpisodeGen:
        if not question or not question.strip():
            raise UsageError("the question is empty")
        c = self.config
        t0 = time.perf_counter()
        cfg = self._decoding()
        trace = self._new_trace(question, cfg, task=task, meta={"k": c.k, "mode": c.mode, "rag_task": c.task})
        self._emit("start", question, agent=self.kind)
        ts = time.perf_counter()
        hits = self.retriever.search(question, k=c.k, mode=c.mode)
        trace.sources = [source_of_hit(i, h) for i, h in enumerate(hits, 1)]
        # planted instructions/answers in the passages flag the trace: it is kept out of training data
        trace.injection_flags = injection_flags("\n".join(s.text for s in trace.sources))
        passages = self._passages(trace.sources)
        search = Step(index=1, action=ToolCall(name="Search", arguments={"query": question}),
                      observation=passages or "(no passages found)", retrieved_ids=[s.chunk_id for s in trace.sources],
                      seconds=round(time.perf_counter() - ts, 4))
        trace.steps.append(search)
        self._emit("action", f"Search[{question}]", 1)
        self._emit("observation", f"retrieved {len(hits)} passages:\n{passages}" if hits else "no passages found", 1)
        if not hits:
            trace.answer = "NOT ENOUGH INFO" if c.task == "claims" else "The documents do not say (nothing matched)."
            trace.fallback = "no-passages"
            self._emit("fallback", "the index returned nothing for this question; no model call was made")
            self._emit("answer", trace.answer, 1)
            return self._close_trace(trace, t0)

        prompt = self.build_prompt(question, trace.sources)
        trace.messages = messages_of(prompt)  # type: ignore[arg-type]
        ts = time.perf_counter()
        gen = (yield ModelCall(prompt, cfg, step=2))[0]
        text = gen.text.strip()
        step = Step(index=2, thought=text, raw_output=gen.text, tokens_in=self.policy.count_tokens(prompt),
                    tokens_out=gen.num_tokens, seconds=round(time.perf_counter() - ts, 4))
        trace.steps.append(step)
        trace.messages.append(Message(role="assistant", content=gen.text))
        trace.meta["answer_text"] = text
        if c.task == "claims":
            label = parse_claim_label(text)
            if label is None:
                step.error, step.error_type = "no verdict in the model's text", "no-answer"
            trace.answer, trace.finished = label, label is not None
        elif text:
            trace.answer, trace.finished = text, True
        else:
            trace.fallback = "extractive"
            # never a sentence that carries a planted answer, action or instruction (retrieved text must not
            # become the answer by its own syntax, issue 14)
            planted = {"planted-answer", "planted-action", "instruction-override"}
            clean = " ".join(s for s in split_sentences(trace.sources[0].text) if not planted & set(injection_flags(s)))
            trace.answer = f"{best_sentence(question, clean)} [1]" if clean else \
                "The documents do not say (the best passage holds only instruction-like text)."
            self._emit("fallback", "the model wrote no answer; showing the best-matching sentence of passage [1] "
                       "instead (extractive fallback)")
        mark_cited(trace.sources, text if text else trace.answer or "")
        trace.meta["cited"] = [s.n for s in trace.sources if s.cited]
        self._emit("answer", trace.answer or "", 2)
        return self._close_trace(trace, t0)
