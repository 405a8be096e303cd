"""Grammar-constrained decoding: outputs valid by construction (issue 10 §2).

At every decode step each constrained row computes the set of tokens that keep its text inside its
grammar; every other token's logit becomes -inf before greedy choice or sampling, and the chosen token
advances the row's matcher. A row whose grammar is complete stops (finish reason ``stop``).

The library is **llguidance** (Microsoft's Rust core of guidance; Earley parser over derivative-based
lexers, Moskal et al. 2025, "LLGuidance: making structured outputs go brrr"). Chosen by
``benchmarks/bench_grammar_libs.py`` on this CPU (SmolLM2 tokenizer, 49152 tokens; figures in
benchmarks/RESULTS.md): against xgrammar, outlines-core and lm-format-enforcer it (a) speaks the three
``GrammarSpec`` kinds natively (regex, Lark with lexeme intersection/negation and per-lexeme
``max_tokens``, JSON schema, and JSON schemas inside Lark via ``%json``), which the agent grammars
below need; (b) compiles lazily in microseconds (outlines-core builds a full index per regex, 0.1-0.5 s);
(c) costs at most a few percent of a model decode step at 1-64 rows (xgrammar was faster on a regex mask,
outlines-core on large JSON batches; all three far below the model); (d) is one abi3 wheel with no Python
dependencies (xgrammar pulls triton, ~200 MB, on x86-64 Linux; lm-format-enforcer is pure Python, 100-700x
slower here, and 0.11 does not import with transformers 5). We do NOT use ``llguidance.torch``'s
``apply_token_bitmask_inplace``: it is ``torch.compile``d, which on CPU compiles C++ at first call (seconds,
and a compiler must be installed); ``apply_bitmask`` below is the same bit unpacking in plain torch ops.

API (what the decoders call)::

    m = matcher_for(spec, tokenizer)             # a fresh per-row matcher; compiled grammars are cached
    masked = apply_masks(logits, [m, None, ...]) # (R, V) logits, -inf where a row's grammar forbids
    m.accept(token_id); m.is_done()              # advance; grammar complete -> the row stops

and the builders of the agents' grammars: ``react_paper_grammar``, ``react_json_grammar``,
``pal_grammar``, ``cot_grammar``, ``label_grammar``. Each grammar is written so that what it allows
parses strictly (no repairs) with ``ragloop.agents.parsing`` / ``pal.extract_program`` /
``cot.parse_answer``, and so that every free-text part is bounded (``max_tokens`` on its lexeme, bounded
repetitions), so a row cannot run out of tokens in the middle of a free-text part that it could not end.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from ragloop.core.errors import UsageError
from ragloop.models.types import GrammarSpec

log = logging.getLogger(__name__)

__all__ = [
    "GrammarCompiler", "GrammarMatcher", "allocate_bitmask", "apply_bitmask", "apply_masks", "compiler_for",
    "cot_grammar", "label_grammar", "matcher_for", "pal_grammar", "react_json_grammar", "react_paper_grammar",
]

_SHIFTS = torch.arange(32, dtype=torch.int32)  # bit k of a 32-bit mask word: token 32*w + k


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed ``(rows, ceil(V/32))`` int32 bitmask (bit k of word w = token ``32*w + k``)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set ``logits[r, t] = -inf`` where bit ``t`` of row ``r`` is 0; in place, returns ``logits``.

    ``apply_bitmask(torch.zeros(1, 3), torch.tensor([[0b101]], dtype=torch.int32)) -> [[0., -inf, 0.]]``
    Tokens past the bitmask's ``32 * W`` columns (a model vocabulary padded past the tokenizer's) are masked.
    """
    rows, vocab = logits.shape  # (R, V)
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # (R, W, 32)
    allowed = bits.reshape(rows, -1).bool()  # (R, 32W)
    width = min(vocab, allowed.shape[1])
    logits[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
    if vocab > width:
        logits[:, width:] = float("-inf")
    return logits


class GrammarMatcher:
    """One row's position in its grammar (an ``llguidance.LLMatcher``)."""

    def __init__(self, matcher: Any, spec: GrammarSpec, end_ids: Sequence[int], executor: Any = None) -> None:
        self._m = matcher
        self.spec = spec
        self._end_ids = list(end_ids)
        self.executor = executor  # the compiler's thread pool: apply_masks fills many rows in parallel with it

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into one int32 bitmask row ``(W,)`` (contiguous, on CPU)."""
        self._m.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        self.check_mask(bitmask_row)

    def check_mask(self, bitmask_row: torch.Tensor) -> None:
        """After a mask was written: a row with nothing allowed may only end."""
        if self._m.is_error() or not bool(bitmask_row.any()):
            # nothing allowed (the grammar is broken for this tokenizer): let the row end rather than
            # sampling from an all -inf row
            bitmask_row.zero_()
            for t in self._end_ids:
                word = (int(bitmask_row[t // 32]) | (1 << (t % 32))) & 0xFFFFFFFF
                bitmask_row[t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # as a signed int32

    def accept(self, token_id: int) -> None:
        """Advance by the chosen token. A token outside the mask is a decoder bug: it raises."""
        if self._m.is_stopped():
            return
        if not self._m.consume_token(int(token_id)) and token_id not in self._end_ids:
            raise RuntimeError(f"grammar {self.spec.name or self.spec.kind!r} rejected token {token_id}: "
                               f"{self._m.get_error()}")

    def is_done(self) -> bool:
        """The grammar is complete and allows nothing more: the decoder stops the row."""
        return bool(self._m.is_stopped())

    def is_accepting(self) -> bool:
        """The text so far is a complete sentence of the grammar (it may still go on)."""
        return bool(self._m.is_accepting())


class GrammarCompiler:
    """Compiles ``GrammarSpec``s for one tokenizer; each spec once (a prototype matcher is deep-copied per
    row, sharing the lexer's caches, which is what makes masks fast after the first rows)."""

    def __init__(self, tokenizer: Any, end_ids: Sequence[int] | None = None) -> None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise UsageError("grammar-constrained decoding needs the llguidance package",
                             hint="pip install llguidance") from e
        self._llg = llguidance
        if end_ids is None:
            end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.end_ids = sorted({int(t) for t in end_ids})
        # the expensive part (~1-3 s): the tokenizer's byte trie in Rust; done once per compiler
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, eos_token=self.end_ids or None)
        self.vocab_size = int(self.lltok.vocab_size)
        # masks of many rows are computed in parallel (Rust threads, GIL released), as many as torch uses
        self.executor = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))
        # compiled prototypes, least recently used dropped past ``max_grammars`` (agents make one per step
        # number and budget; a long-running server must not grow without bound)
        self._protos: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self.max_grammars = 256
        self._lock = threading.Lock()

    def _grammar(self, spec: GrammarSpec) -> str:
        M = self._llg.LLMatcher
        if spec.kind == "regex":
            return M.grammar_from_regex(spec.source)
        if spec.kind == "lark":
            return M.grammar_from_lark(spec.source)
        if spec.kind == "json_schema":
            return M.grammar_from_json_schema(spec.source)
        raise UsageError(f"unknown grammar kind {spec.kind!r}", hint="use regex, lark or json_schema")

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher at the start of ``spec``; a bad grammar is a UsageError naming it."""
        with self._lock:
            proto = self._protos.get(spec)
            if proto is not None:
                self._protos.move_to_end(spec)
            else:
                proto = self._llg.LLMatcher(self.lltok, self._grammar(spec), log_level=0)
                if proto.is_error():
                    raise UsageError(f"grammar {spec.name or spec.kind!r} does not compile: "
                                     f"{proto.get_error().strip().splitlines()[0]}",
                                     hint="check the grammar's syntax (llguidance Lark / regex / JSON schema)")
                self._protos[spec] = proto
                while len(self._protos) > self.max_grammars:
                    self._protos.popitem(last=False)
            return GrammarMatcher(proto.deep_copy(), spec, self.end_ids, self.executor)


# Compilers per tokenizer, alive as long as the tokenizer is: a weak-key map rather than an attribute on the
# tokenizer, which would make the user's tokenizer impossible to copy or pickle (the compiler holds C objects).
_COMPILERS: weakref.WeakKeyDictionary[Any, dict[Any, GrammarCompiler]] = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer: Any, end_ids: Sequence[int] | None = None) -> GrammarCompiler:
    """The tokenizer's grammar compiler, built once per tokenizer (and end ids) and dropped with it."""
    key = tuple(sorted(int(t) for t in end_ids)) if end_ids is not None else None
    with _COMPILERS_LOCK:
        try:
            cache = _COMPILERS.setdefault(tokenizer, {})
        except TypeError:  # pragma: no cover - a tokenizer that cannot be weakly referenced: no caching
            cache = {}
        comp = cache.get(key)
        if comp is None:
            comp = cache[key] = GrammarCompiler(tokenizer, end_ids)
    return comp


def matcher_for(spec: GrammarSpec, tokenizer: Any, end_ids: Sequence[int] | None = None) -> GrammarMatcher:
    """A fresh matcher for one row decoding under ``spec`` (the grammar compiled once per tokenizer)."""
    return compiler_for(tokenizer, end_ids).matcher(spec)


def apply_masks(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor:
    """Mask ``logits`` ``(R, V)`` in place row by row (``None`` = unconstrained row); returns ``logits``."""
    rows = [r for r, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    words = (logits.shape[-1] + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)  # (R, W), all allowed
    first = matchers[rows[0]]
    executor = first.executor if first is not None else None
    if len(rows) > 1 and executor is not None and all(matchers[r].executor is executor for r in rows):  # type: ignore[union-attr]
        # one call for every row: the rows' masks are computed in parallel into their rows of ``bitmask``
        executor.unsafe_compute_mask_ptr([(matchers[r]._m, r) for r in rows], bitmask.data_ptr(),  # type: ignore[union-attr]
                                         words * 4, len(matchers))
        for r in rows:
            matchers[r].check_mask(bitmask[r])  # type: ignore[union-attr]
    else:
        for r in rows:
            matchers[r].fill_mask(bitmask[r])  # type: ignore[union-attr]
    apply_bitmask(logits, bitmask)
    return logits


# ------------------------------------------------------------------------------------------ builders
def _lit(s: str) -> str:
    """A Lark string literal: ``_lit('a"b\\n') -> '"a\\\\"b\\\\n"'``."""
    return json.dumps(s)


# A free line of text that the ReAct parser reads as a thought: not a label line ("Action 2:", "Thought:"),
# not a markdown label ("**Action**"), no data delimiters (observation copies are refused by the parser).
_THOUGHT = (r'/ [^\n]*/ & ~/(?i)[ \t]*(action|thought|final answer|answer|observation)[ \t]*[0-9]*[ \t]*[:：].*/'
            r' & ~/[ \t]*\*\*.*/ & ~/(?i).*<\/?data>.*/')
# the bracket argument: one line, no ']', not blank, not wrapped in quotes, no "Observation:" inside
_ARG = (r'/[^\]\n]+/ & ~/[ \t]*/ & ~/[ \t]*".*"[ \t]*/ & ~/[ \t]*\'.*\'[ \t]*/ & ~/[ \t]*`.*`[ \t]*/'
        r' & ~/(?is).*observation[ \t]*[0-9]*[ \t]*:.*/')


# compact one-line JSON: the ReAct parser reads an action from one line, and free whitespace lets a weak
# model spend its whole token budget on spaces inside the object
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json_args_schema(schema: dict[str, Any], max_chars: int = 80) -> dict[str, Any]:
    """A pydantic argument schema with every object closed (no extra keys) and strings bounded."""
    out = json.loads(json.dumps(schema))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                node.setdefault("additionalProperties", False)
            if node.get("type") == "string":
                node.setdefault("maxLength", max_chars)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    out.pop("title", None)
    return out


def react_paper_grammar(
    tools: Sequence[Any],
    *,
    step: int,
    max_thought_tokens: int = 64,
    max_arg_tokens: int = 48,
    finish_labels: Sequence[str] | None = None,
) -> GrammarSpec:
    """One ReAct step in the paper's format, after a prompt ending with ``Thought {step}:``::

        <one-line thought>\\nAction {step}: Tool[argument]

    ``tools``: Tool objects (``name``, ``args_model``) or names. A one-argument tool takes free text in the
    brackets; a tool with several arguments takes a JSON object of them (``Tool.bind`` reads it), checked
    against its pydantic schema. ``finish_labels`` restricts ``Finish[...]`` to a label set (claim
    verification). Generated tokens are at most ``max_thought_tokens + max_arg_tokens`` plus the fixed
    text (label, tool name, brackets: one token per character at worst).
    """
    if not tools:
        raise UsageError("react_paper_grammar needs at least one tool")
    calls = []
    for i, t in enumerate(tools):
        name = t if isinstance(t, str) else t.name
        fields = [] if isinstance(t, str) else list(t.args_model.model_fields)
        if name == "Finish" and finish_labels:
            calls.append(f'{_lit(name + "[")} ({" | ".join(_lit(x) for x in finish_labels)}) "]"')
        elif len(fields) > 1:
            calls.append(f'{_lit(name + "[")} jargs{i} "]"')
        else:
            calls.append(f'{_lit(name + "[")} arg "]"')
    action = _lit(f"\nAction {step}: ")
    lines = [
        f"start: thought {action} call",
        f"thought[max_tokens={max_thought_tokens}]: THOUGHT",
        f"THOUGHT: {_THOUGHT}",
        "call: " + " | ".join(calls),
        f"arg[max_tokens={max_arg_tokens}]: ARG",
        f"ARG: {_ARG}",
    ]
    for i, t in enumerate(tools):
        if not isinstance(t, str) and len(t.args_model.model_fields) > 1:
            schema = _json_args_schema(t.args_model.model_json_schema())
            schema["x-guidance"] = _JSON_STYLE
            lines.append(f"jargs{i}: %json {json.dumps(schema)}")
    return GrammarSpec("lark", "\n".join(lines) + "\n", name=f"react-paper:{','.join(_names(tools))}")


def _names(tools: Sequence[Any]) -> list[str]:
    return [t if isinstance(t, str) else t.name for t in tools]


def react_json_grammar(tools: Sequence[Any], *, step: int, max_thought_tokens: int = 64,
                       finish_labels: Sequence[str] | None = None) -> GrammarSpec:
    """One ReAct step in the JSON tool-call format (``--action-format json``)::

        <one-line thought>\\nAction {step}: {"tool": "<name>", "arguments": {...}}

    The call is a JSON schema: one alternative per tool, ``"tool"`` its name as a constant and
    ``"arguments"`` its pydantic argument schema (every argument of multi-argument tools, required ones
    required, no extra keys). The thought cannot hold ``{`` or a code fence (the parser takes the first
    ``{`` as the call).
    """
    if not tools:
        raise UsageError("react_json_grammar needs at least one tool")
    alts = []
    for t in tools:
        if isinstance(t, str):
            args: dict[str, Any] = {"type": "object", "properties": {"input": {"type": "string", "maxLength": 80}},
                                    "required": ["input"], "additionalProperties": False}
            name = t
        else:
            args, name = _json_args_schema(t.args_model.model_json_schema()), t.name
        if name == "Finish" and finish_labels:
            key = next(iter(args.get("properties", {"answer": None})))
            args = {"type": "object", "properties": {key: {"enum": list(finish_labels)}}, "required": [key],
                    "additionalProperties": False}
        alts.append({"type": "object", "properties": {"tool": {"const": name}, "arguments": args},
                     "required": ["tool", "arguments"], "additionalProperties": False})
    schema = {"anyOf": alts} if len(alts) > 1 else dict(alts[0])
    schema["x-guidance"] = _JSON_STYLE
    thought = _THOUGHT + r" & ~/.*[{`].*/"
    action = _lit(f"\nAction {step}: ")
    src = "\n".join([
        f"start: thought {action} call",
        f"thought[max_tokens={max_thought_tokens}]: THOUGHT",
        f"THOUGHT: {thought}",
        f"call: %json {json.dumps(schema)}",
    ]) + "\n"
    return GrammarSpec("lark", src, name=f"react-json:{','.join(_names(tools))}")


_PY_KEYWORDS = ("False None True and as assert async await break class continue def del elif else except "
                "finally for from global if import in is lambda nonlocal not or pass raise return try while "
                "with yield").split()
_PY_FUNCS = ("round", "int", "float", "abs", "min", "max")


def pal_grammar(*, prefilled: bool = True, max_statements: int = 12, max_comment_tokens: int = 24) -> GrammarSpec:
    """A PAL program (Gao et al. 2023): the body of ``def solution():`` as assignments with arithmetic and
    comments, ending with ``return <expression>`` and a newline.

    ``prefilled``: the prompt already ends with ``def solution():`` and its docstring line (PAL's default),
    so the text starts with the body's first newline; otherwise the grammar writes the header too. Every
    program it allows parses and passes the sandbox's AST allow-list (names, numbers, + - * / // % **,
    parentheses, round/int/float/abs/min/max); expressions are at most 5 terms, parenthesised groups at
    most 3 atoms, names 24 characters, numbers 9+6 digits; statements at most ``max_statements``.
    """
    kw = "|".join(_PY_KEYWORDS + list(_PY_FUNCS))
    head = "" if prefilled else r'"def solution():" '
    src = "\n".join([
        f"start: {head}(NL stmt){{0,{max_statements}}} NL \"return \" expr \"\\n\"",
        r'NL: "\n    "',
        "stmt: NAME \" = \" expr comment? | line_comment",
        f"comment[max_tokens={max_comment_tokens}]: COMMENT",
        f"line_comment[max_tokens={max_comment_tokens}]: LINE_COMMENT",
        r'COMMENT: /  # [^\n]*/',
        r'LINE_COMMENT: /# [^\n]*/',
        "expr: term (OP term){0,4}",
        "term: atom | \"-\" atom | \"(\" group \")\" | FUNC \"(\" group (\", \" group){0,2} \")\"",
        "group: atom (OP atom){0,2}",
        "atom: NAME | NUMBER",
        'OP: " + " | " - " | " * " | " / " | " // " | " % " | " ** "',
        f"FUNC: {' | '.join(_lit(f) for f in _PY_FUNCS)}",
        r"NUMBER: /[0-9]{1,9}(\.[0-9]{1,6})?/",
        f"NAME: /[a-z][a-z0-9_]{{0,23}}/ & ~/({kw})/",
    ]) + "\n"
    return GrammarSpec("lark", src, name="pal" if prefilled else "pal-full")


def cot_grammar(*, max_lines: int = 4, max_line_tokens: int = 48) -> GrammarSpec:
    """Free reasoning, then a final line ``The answer is <number>.`` (Wei et al. 2022's answer phrase)::

        <reasoning line>\\n ... <reasoning line>\\nThe answer is -12.5.

    Reasoning lines never contain "the answer is" (so the parsed answer is the final line's) nor start a
    new question; at most ``max_lines`` lines of at most ``max_line_tokens`` tokens each (the lexer of a
    line can end anywhere, so a long line is cut and the final line follows).
    """
    src = "\n".join([
        f"start: line (\"\\n\" line){{0,{max_lines - 1}}} \"\\n\" FINAL",
        f"line[max_tokens={max_line_tokens}]: LINE",
        r"LINE: /[^\n]*/ & ~/(?i).*the answer is.*/ & ~/(?i)[ \t]*Q:.*/",
        r"FINAL: /The answer is -?[0-9]{1,9}(\.[0-9]{1,4})?\./",
    ]) + "\n"
    return GrammarSpec("lark", src, name="cot")


def label_grammar(labels: Sequence[str], *, prefix: str = " ") -> GrammarSpec:
    """Exactly one of ``labels`` after ``prefix`` (claim verification: SUPPORTS / REFUTES / NOT ENOUGH INFO)."""
    if not labels:
        raise UsageError("label_grammar needs at least one label")
    import re

    return GrammarSpec("regex", re.escape(prefix) + "(" + "|".join(re.escape(x) for x in labels) + ")",
                       name="label:" + "|".join(labels))
