"""Training data for alignment: traces → SFT rows, preference pairs, and teacher programs for GSM8K.

Everything here is a small pure function tested on literal inputs. Row shapes follow the conventions of
the field (TRL's dataset formats): an SFT row is ``{"messages": [...]}`` where each message has ``role``,
``content`` and ``trainable``; a preference pair is ``{"prompt", "chosen", "rejected"}`` with the preferred
response always in ``chosen``.

- ``traces_to_sft_rows``: the exact messages a policy saw and produced; only the model's own assistant
  turns are trainable (observations, tool output and retrieved text are context only).
- ``ranking_to_pairs``: a ranking of n responses → all C(n, 2) pairs, better first (the reward-model recipe
  of Ouyang et al. 2022, §3.5).
- ``outcome_pairs``: traces of the same question with different outcomes → correct-vs-incorrect pairs.
- ``hh_transcript_to_pair``: Anthropic HH transcripts (Bai et al. 2022a) that differ only in the last
  Assistant turn → one pair whose prompt is the shared dialogue.
- ``gsm8k_answer_to_program``: GSM8K solutions carry calculator annotations ``<<48/2=24>>`` (Cobbe et al.
  2021); they convert mechanically into a PAL program (Gao et al. 2023) whose value is checked against the
  gold answer — a legitimate teacher signal next to the model's own correct samples.
- ``validate_sft_rows`` / ``validate_pairs`` / ``load_jsonl_rows``: up-front validation with counts of what
  was dropped and why (SECURITY.md §5: empty file, missing fields, huge rows, bad encoding).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import keyword
import math
import operator
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ragloop.core.errors import DataError
from ragloop.core.trace import Message, Trace

# ----------------------------------------------------------------------------------------------- rows


class SFTRow(BaseModel):
    """One supervised example: chat messages; the loss covers trainable assistant messages only."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Message]
    source: str = ""  # where the row came from ("trace:<id>", "gsm8k-teacher", …), for mixing and audits
    # "chat": rendered with the policy's chat template; "raw": a plain completion prompt (e.g. PAL's raw
    # style), the messages' contents concatenated as they were fed to the model
    template: Literal["chat", "raw"] = "chat"

    @field_validator("messages")
    @classmethod
    def _has_trainable_assistant(cls, v: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" and m.trainable and m.content.strip() for m in v):
            raise ValueError("no trainable assistant message (nothing to learn from)")
        return v


class PreferencePair(BaseModel):
    """A preference pair, the preferred response first. ``prompt`` is plain text (the dialogue so far)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    chosen: str
    rejected: str

    @field_validator("chosen", "rejected")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty response")
        return v


@dataclass
class DropReport:
    """How many rows were read, kept and dropped, with a count per reason."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    fitted: int = 0  # kept rows shortened to fit (whole context exemplars removed, never the answer)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "fitted": self.fitted}

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        fit = f"; {self.fitted} fitted to the length limit by dropping context exemplars" if self.fitted else ""
        return f"{self.kept} of {self.read} rows kept (dropped — {why}){fit}"


# ------------------------------------------------------------------------------------ traces → SFT rows


def trace_to_sft_row(trace: Trace, *, source: str | None = None) -> SFTRow | None:
    """The trace's messages as an SFT row; assistant messages keep their ``trainable`` flag and every other
    role is context. None when the trace has no trainable assistant text."""
    msgs = [
        Message(role=m.role, content=m.content, trainable=(m.role == "assistant" and m.trainable))
        for m in trace.messages
    ]
    template = "raw" if trace.meta.get("prompt_style") == "raw" else "chat"
    try:
        return SFTRow(messages=msgs, source=source or f"trace:{trace.id}", template=template)
    except ValidationError:
        return None


def format_valid(trace: Trace) -> bool:
    """The agent reached an answer by its own format: it finished, without a fallback or a parse error on
    the final step."""
    if not trace.finished or trace.fallback is not None or trace.answer is None:
        return False
    return not (trace.steps and trace.steps[-1].error_type in ("parse", "format"))


def filter_traces(
    traces: Iterable[Trace],
    *,
    require_correct: bool = True,
    require_format: bool = True,
    drop_injection: bool = True,
    report: DropReport | None = None,
) -> list[Trace]:
    """Keep traces worth imitating: correct (``feedback.correct``), well-formed, and with no injection
    heuristic tripped by their context text. Reasons for dropping are counted in ``report``."""
    report = report if report is not None else DropReport()
    kept: list[Trace] = []
    for t in traces:
        report.read += 1
        if drop_injection and t.injection_flags:
            report.drop("injection_flag")
        elif require_format and not format_valid(t):
            report.drop("format_invalid")
        elif require_correct and t.feedback.correct is not True:
            report.drop("incorrect" if t.feedback.correct is False else "unjudged")
        else:
            kept.append(t)
            report.kept += 1
    return kept


def traces_to_sft_rows(
    traces: Iterable[Trace], *, dedupe: bool = True, include_flagged: bool = False
) -> tuple[list[SFTRow], DropReport]:
    """Convert traces to SFT rows; identical rows (same messages) are kept once when ``dedupe``.

    Traces whose context tripped an injection heuristic (``trace.injection_flags``, e.g. a retrieved
    document with a planted action) are dropped and counted as ``injection_flag`` unless
    ``include_flagged`` (SECURITY.md §4). Other filtering (correctness, format) is ``filter_traces``'s."""
    report = DropReport()
    rows: list[SFTRow] = []
    seen: set[str] = set()
    for t in traces:
        report.read += 1
        if t.injection_flags and not include_flagged:
            report.drop("injection_flag")
            continue
        row = trace_to_sft_row(t)
        if row is None:
            report.drop("no_trainable_assistant")
            continue
        key = row_hash(row.model_dump(include={"messages"}))
        if dedupe and key in seen:
            report.drop("duplicate")
            continue
        seen.add(key)
        rows.append(row)
        report.kept += 1
    return rows, report


def trace_prompt_text(trace: Trace) -> str:
    """The context the model answered: every message before the first assistant turn, as plain text
    (``"user: …"`` lines). Used as the reward model's prompt."""
    out: list[str] = []
    for m in trace.messages:
        if m.role == "assistant":
            break
        if m.role != "system":
            out.append(m.content)
    return "\n".join(out).strip() or trace.question


def trace_response_text(trace: Trace) -> str:
    """The model's trajectory from its first turn: assistant text verbatim, later context (observations)
    after it, joined by newlines. For PAL this is the program."""
    out: list[str] = []
    started = False
    for m in trace.messages:
        started = started or m.role == "assistant"
        if started:
            out.append(m.content)
    return "\n".join(out).strip()


# ------------------------------------------------------------------------------------------------ pairs


def ranking_to_pairs(prompt: str, ranked: Sequence[str]) -> list[PreferencePair]:
    """All C(n, 2) pairs from responses ranked best first, the better response always ``chosen``:
    ``ranking_to_pairs("p", ["a", "b", "c"]) -> [(a>b), (a>c), (b>c)]``."""
    if len(set(ranked)) != len(ranked):
        raise DataError("a ranking lists the same response twice; rank distinct responses")
    return [PreferencePair(prompt=prompt, chosen=a, rejected=b) for a, b in itertools.combinations(ranked, 2)]


def scores_to_pairs(prompt: str, responses: Sequence[str], scores: Sequence[float]) -> list[PreferencePair]:
    """Pairs from scored responses (higher is better); ties and duplicate texts make no pair:
    ``scores_to_pairs("p", ["a", "b", "c"], [1, 3, 1]) -> [(b>a), (b>c)]``."""
    if len(responses) != len(scores):
        raise DataError(f"{len(responses)} responses but {len(scores)} scores")
    pairs: list[PreferencePair] = []
    for (ra, sa), (rb, sb) in itertools.combinations(zip(responses, scores, strict=True), 2):
        if sa == sb or ra == rb:
            continue
        hi, lo = (ra, rb) if sa > sb else (rb, ra)
        pairs.append(PreferencePair(prompt=prompt, chosen=hi, rejected=lo))
    return pairs


def outcome_pairs(
    traces: Iterable[Trace],
    *,
    max_pairs_per_question: int | None = None,
    include_flagged: bool = False,
    report: DropReport | None = None,
) -> list[PreferencePair]:
    """Traces of the same question with different outcomes → pairs (correct chosen over incorrect; among
    incorrect ones, a well-formed answer over a malformed one is *not* used — only correctness counts).
    Traces with injection flags are left out (counted in ``report`` as ``injection_flag``) unless
    ``include_flagged``."""
    by_q: dict[str, list[Trace]] = defaultdict(list)
    for t in traces:
        if t.injection_flags and not include_flagged:
            if report is not None:
                report.read += 1
                report.drop("injection_flag")
            continue
        if report is not None:
            report.read += 1
            report.kept += 1
        if t.feedback.correct is not None:
            by_q[t.question].append(t)
    pairs: list[PreferencePair] = []
    for q, group in by_q.items():
        good = _unique_by_response([t for t in group if t.feedback.correct])
        bad = _unique_by_response([t for t in group if not t.feedback.correct])
        prompt = trace_prompt_text(group[0]) or q
        made = 0
        for g, b in itertools.product(good, bad):
            if max_pairs_per_question is not None and made >= max_pairs_per_question:
                break
            pairs.append(PreferencePair(prompt=prompt, chosen=trace_response_text(g), rejected=trace_response_text(b)))
            made += 1
    return pairs


def _unique_by_response(traces: list[Trace]) -> list[Trace]:
    seen: set[str] = set()
    out = []
    for t in traces:
        r = trace_response_text(t)
        if r and r not in seen:
            seen.add(r)
            out.append(t)
    return out


_HH_ASSISTANT = "\n\nAssistant:"


def hh_transcript_to_pair(chosen: str, rejected: str) -> PreferencePair:
    """An HH-RLHF row (two transcripts differing only in the last Assistant turn) → one pair whose prompt
    is the shared dialogue up to and including the last ``Assistant:`` tag.

    ``hh_transcript_to_pair("\\n\\nHuman: hi\\n\\nAssistant: hello", "\\n\\nHuman: hi\\n\\nAssistant: go away")
    -> prompt "Human: hi\\n\\nAssistant:", chosen "hello", rejected "go away"``"""
    i, j = chosen.rfind(_HH_ASSISTANT), rejected.rfind(_HH_ASSISTANT)
    if i < 0 or j < 0:
        raise DataError("an HH transcript has no '\\n\\nAssistant:' turn")
    prompt_c, prompt_r = chosen[: i + len(_HH_ASSISTANT)], rejected[: j + len(_HH_ASSISTANT)]
    if prompt_c != prompt_r:
        raise DataError("the two HH transcripts differ before their last Assistant turn")
    return PreferencePair(
        prompt=prompt_c.strip(),
        chosen=chosen[i + len(_HH_ASSISTANT) :].strip(),
        rejected=rejected[j + len(_HH_ASSISTANT) :].strip(),
    )


# ----------------------------------------------------------------------------------- loading/validation


def row_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (sorted keys), for dedupe and data manifests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_jsonl_rows(path: str | Path, *, max_bytes_per_row: int = 1_000_000) -> tuple[list[dict], DropReport]:
    """Read a JSONL file into dicts; undecodable, non-JSON, non-object and huge lines are dropped and
    counted. A missing or empty file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    report = DropReport()
    rows: list[dict] = []
    with path.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            report.read += 1
            if len(raw) > max_bytes_per_row:
                report.drop("row_too_large")
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                report.drop("bad_encoding")
                continue
            except json.JSONDecodeError:
                report.drop("not_json")
                continue
            if not isinstance(obj, dict):
                report.drop("not_an_object")
                continue
            rows.append(obj)
            report.kept += 1
    if report.read == 0:
        raise DataError(f"data file is empty: {path}", hint="write one JSON object per line")
    return rows, report


def validate_sft_rows(raw: Iterable[dict], *, max_chars: int = 200_000) -> tuple[list[SFTRow], DropReport]:
    """Validate ``{"messages": [...]}`` rows (a trace line is accepted too, by its ``messages``)."""
    report = DropReport()
    rows: list[SFTRow] = []
    for obj in raw:
        report.read += 1
        if "messages" not in obj:
            report.drop("missing_messages")
            continue
        if sum(len(str(m.get("content", ""))) for m in obj["messages"] if isinstance(m, dict)) > max_chars:
            report.drop("row_too_large")
            continue
        msgs = obj["messages"]
        if isinstance(msgs, list) and "question" in obj:  # a Trace line: mask non-assistant roles
            msgs = [dict(m, trainable=(m.get("role") == "assistant" and m.get("trainable", True))) for m in msgs
                    if isinstance(m, dict)]
        try:
            template = obj.get("template") or ("raw" if (obj.get("meta") or {}).get("prompt_style") == "raw" else "chat")
            rows.append(SFTRow(messages=msgs, source=str(obj.get("source", "")), template=template))
        except ValidationError as e:
            msg = e.errors()[0].get("msg", "")
            report.drop("no_trainable_assistant" if "trainable" in msg else "bad_messages")
            continue
        report.kept += 1
    return rows, report


def validate_pairs(raw: Iterable[dict], *, max_chars: int = 50_000) -> tuple[list[PreferencePair], DropReport]:
    """Validate ``{"prompt","chosen","rejected"}`` rows; HH rows (``chosen``/``rejected`` transcripts with no
    ``prompt``) are split with ``hh_transcript_to_pair``."""
    report = DropReport()
    pairs: list[PreferencePair] = []
    for obj in raw:
        report.read += 1
        if not isinstance(obj.get("chosen"), str) or not isinstance(obj.get("rejected"), str):
            report.drop("missing_chosen_or_rejected")
            continue
        if len(obj["chosen"]) + len(obj["rejected"]) + len(str(obj.get("prompt", ""))) > max_chars:
            report.drop("row_too_large")
            continue
        try:
            if "prompt" in obj:
                pair = PreferencePair(prompt=str(obj["prompt"]), chosen=obj["chosen"], rejected=obj["rejected"])
            else:
                pair = hh_transcript_to_pair(obj["chosen"], obj["rejected"])
        except (ValidationError, DataError):
            report.drop("bad_pair")
            continue
        if pair.chosen == pair.rejected:
            report.drop("identical_responses")
            continue
        pairs.append(pair)
        report.kept += 1
    return pairs, report


# ------------------------------------------------------------------------- GSM8K annotations → programs

_ANNOT_RE = re.compile(r"<<([^<>=]+)=([^<>]*)>>")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_STOP = {"the", "a", "an", "of", "and", "to", "in", "is", "are", "for", "on", "at", "it", "he", "she",
         "they", "per", "so", "that", "which", "with", "by", "from", "was", "were", "be", "has", "have", "his",
         "her", "their", "this", "will", "each", "total", "more", "than", "or", "as", "left", "there"}


def _eval_arith(node: ast.AST, env: dict[str, float]) -> float:
    """Evaluate a parsed arithmetic expression (numbers, names bound in ``env``, + - * / // % **)."""
    if isinstance(node, ast.Expression):
        return _eval_arith(node.body, env)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval_arith(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_arith(node.left, env), _eval_arith(node.right, env)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def _name_from(text_after: str, used: set[str], step: int) -> str:
    """A variable name from the words after a computed number: ``"24 clips in May."`` → ``clips_may``."""
    words = re.findall(r"[A-Za-z]+", re.split(r"[.,;:!?\n]", text_after, maxsplit=1)[0])
    words = [w.lower() for w in words if w.lower() not in _STOP][:3]
    name = "_".join(words)
    if not name or not name.isidentifier() or keyword.iskeyword(name) or name in ("result", "solution"):
        name = f"step{step}"
    base, k = name, 2
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


def _normalise_expr(expr: str) -> str:
    # GSM8K annotations sometimes write 1,000 or use x for times; both are mechanical to fix.
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)
    return expr.replace("x", "*").replace("^", "**").replace("$", "").strip()


def gsm8k_gold(answer: str) -> str:
    """The gold answer of a GSM8K solution: the number after the last ``####``."""
    if "####" not in answer:
        raise DataError("a GSM8K answer has no '####' line")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_answer_to_program(question: str, answer: str, *, comments: bool = True) -> str | None:
    """Convert a GSM8K solution with calculator annotations into a PAL ``def solution():`` program, or None
    when it cannot be converted mechanically (no annotations, non-arithmetic expressions, or a program
    whose value differs from the gold answer).

    Each annotation ``<<expr=value>>`` becomes one assignment; literals in later expressions that equal an
    earlier computed value are replaced by that variable (the value is unchanged, the data flow shows);
    the sentence it came from becomes a comment. The program returns the last computed value::

        >>> print(gsm8k_answer_to_program("Q?", "She sold 48/2 = <<48/2=24>>24 clips in May.\\n"
        ...                                     "So 48+24 = <<48+24=72>>72 clips.\\n#### 72", comments=False))
        def solution():
            \"\"\"Q?\"\"\"
            clips_may = 48 / 2
            clips = 48 + clips_may
            result = clips
            return result
    """
    gold = _number(gsm8k_gold(answer))
    body = answer.rsplit("####", 1)[0]
    annots = list(_ANNOT_RE.finditer(body))
    if gold is None or not annots:
        return None
    env: dict[str, float] = {}
    values: list[tuple[str, float]] = []  # (variable, value) in order of computation
    used: set[str] = set()
    lines: list[str] = []
    last_line_no = -1
    for step, m in enumerate(annots, 1):
        expr = _normalise_expr(m.group(1))
        try:
            tree = ast.parse(expr, mode="eval")
            _eval_arith(tree, {})
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
            return None
        tree = _link_literals(tree, values)
        try:
            value = _eval_arith(tree, env)
        except (ValueError, ZeroDivisionError, OverflowError, TypeError):
            return None
        name = _name_from(body[m.end():], used, step)
        env[name] = value
        values.append((name, value))
        line_no = body.count("\n", 0, m.start())
        if comments and line_no != last_line_no:
            sentence = _ANNOT_RE.sub("", body.splitlines()[line_no]).strip()
            if sentence:
                lines.append(f"    # {sentence}")
            last_line_no = line_no
        lines.append(f"    {name} = {ast.unparse(tree)}")
    final_name, final_value = values[-1]
    if not _close(final_value, gold):
        return None
    doc = question.replace("\\", "\\\\").replace('"""', "'''").strip()
    if doc.endswith('"'):
        doc += " "  # a closing quote would merge with the docstring's own quotes
    head = ["def solution():", f'    """{doc}"""']
    return "\n".join(head + lines + [f"    result = {final_name}", "    return result"])


def _link_literals(tree: ast.Expression, values: list[tuple[str, float]]) -> ast.Expression:
    """Replace number literals equal to an earlier computed value by that value's variable (latest first)."""

    class _Link(ast.NodeTransformer):
        def visit_Constant(self, node: ast.Constant) -> ast.AST:
            if isinstance(node.value, int | float) and not isinstance(node.value, bool):
                for name, v in reversed(values):
                    if _close(float(node.value), v):
                        return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)
            return node

    return ast.fix_missing_locations(_Link().visit(tree))


def program_value(program: str) -> float | None:
    """Evaluate a straight-line program built by ``gsm8k_answer_to_program`` without executing code: each
    assignment is evaluated by the arithmetic evaluator. None if the program is not of that shape."""
    try:
        mod = ast.parse(program)
    except SyntaxError:
        return None
    if len(mod.body) != 1 or not isinstance(mod.body[0], ast.FunctionDef):
        return None
    env: dict[str, float] = {}
    for stmt in mod.body[0].body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                env[stmt.targets[0].id] = _eval_arith(ast.Expression(stmt.value), env)
            except (ValueError, ZeroDivisionError, OverflowError, TypeError):
                return None
        elif isinstance(stmt, ast.Return) and stmt.value is not None:
            try:
                return _eval_arith(ast.Expression(stmt.value), env)
            except (ValueError, ZeroDivisionError, OverflowError, TypeError):
                return None
        else:
            return None
    return None


def program_body(program: str) -> str:
    """The statements of ``def solution():`` after its docstring, as source lines — what a model writes
    after PAL's prefilled ``def solution():`` + docstring:
    ``program_body('def solution():\\n    \"\"\"Q\"\"\"\\n    x = 1\\n    return x') -> '    x = 1\\n    return x'``."""
    fn = ast.parse(program).body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise DataError("not a function definition")
    stmts = fn.body
    if stmts and isinstance(stmts[0], ast.Expr) and isinstance(getattr(stmts[0], "value", None), ast.Constant):
        stmts = stmts[1:]
    if not stmts:
        raise DataError("the function has no statements after its docstring")
    lines = program.split("\n")
    first = stmts[0].lineno - 1
    # keep comment lines directly above the first statement
    while first > 0 and lines[first - 1].strip().startswith("#"):
        first -= 1
    return "\n".join(lines[first:])


def hh_transcript_to_messages(transcript: str) -> list[Message]:
    """An HH transcript (``\\n\\nHuman: …\\n\\nAssistant: …``) as chat messages (user/assistant turns)."""
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + transcript.strip())
    msgs: list[Message] = []
    for i in range(1, len(parts) - 1, 2):
        role = "user" if parts[i] == "Human" else "assistant"
        text = parts[i + 1].strip()
        if text:
            msgs.append(Message(role=role, content=text))
    return msgs
