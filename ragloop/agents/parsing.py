"""Parsing ReAct steps from the model's own text, with recorded repairs for small models' near-misses.

Format of ReAct (Yao et al. 2023, "ReAct: Synergizing Reasoning and Acting in Language Models")::

    Thought 2: <free text>
    Action 2: Search[query] | Lookup[keyword] | Finish[answer]

and a JSON tool-call format::

    Thought: <free text>
    {"tool": "Search", "arguments": {"query": "..."}}

Security (SECURITY.md §4): these functions are only ever given the model's generation for one step —
the agent stops generation at ``Observation`` and never passes observation text here — and every
pattern is line-anchored, so a planted ``Finish[...]`` inside prose does not count as an action. A
model can still *reproduce* a planted action on a line of its own; the agent refuses those by provenance
(``ragloop.agents.safety.ProvenanceGuard``), whichever parser (or grammar) produced the action.

Repairs: a 135M model often writes ``Action: search["x"]`` or ``Search(x)``. Each accepted near-miss is
named in ``ParsedStep.repairs`` (and so in the Trace), so format validity can be measured strictly
(no repairs) and leniently (parsed).

Example::

    >>> p = parse_react_text(" I should look.\\nAction 1: search[\\"High Plains\\"]", step=1,
    ...                      tools=["Search", "Lookup", "Finish"])
    >>> (p.thought, p.tool, p.argument, p.repairs)
    ('I should look.', 'Search', 'High Plains', ['tool-name-case', 'quoted-argument'])
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FORMAT_HINT_TEXT = "Write exactly one line 'Action {i}: Tool[argument]' using one of: {tools}."
FORMAT_HINT_JSON = 'Write one JSON object {{"tool": <name>, "arguments": {{...}}}} using one of: {tools}.'


@dataclass
class ParsedStep:
    """One step read from the model's text."""

    thought: str = ""
    tool: str | None = None  # canonical tool name from the registry
    argument: str | dict[str, Any] | None = None
    repairs: list[str] = field(default_factory=list)
    error: str | None = None  # text for the model (becomes the observation) when no action was read
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.tool is not None and self.error is None


_MD_LABEL_RE = re.compile(r"^(\s*)\*\*\s*(thought|action|final answer)(\s*\d*)\s*(:?)\s*\*\*\s*:?", re.I | re.M)
_ACTION_LINE_RE = re.compile(r"^[ \t]*(action)[ \t]*(\d+)?[ \t]*[:：][ \t]*(.*)$", re.I | re.M)
_THOUGHT_PREFIX_RE = re.compile(r"^\s*thought[ \t]*\d*[ \t]*[:：]\s*", re.I)
_FINAL_ANSWER_RE = re.compile(r"^[ \t]*(final answer|answer)[ \t]*[:：][ \t]*(.+)$", re.I | re.M)
_CALL_RE = re.compile(r"^([A-Za-z][A-Za-z_ ]{0,30}?)[ \t]*([\[(])(.*)$", re.S)
_OBS_INLINE_RE = re.compile(r"\s*\bObservation\b\s*\d*\s*:.*$", re.I | re.S)


def quotes_observation(text: str) -> bool:
    """True when ``text`` contains the data delimiters that wrap observations (it copies tool output)."""
    low = text.lower()
    return "<data>" in low or "</data>" in low


def resolve_tool(name: str, tools: Sequence[str], repairs: list[str]) -> str | None:
    """Canonical tool name for ``name``: exact, case-insensitive (repair), or a close spelling (repair).

    ``resolve_tool("serch", ["Search", "Finish"], r) -> "Search"`` with ``r == ["tool-name-fuzzy"]``.
    """
    name = name.strip()
    if name in tools:
        return name
    lower = {t.lower(): t for t in tools}
    key = name.lower().replace(" ", "").replace("_", "")
    for t_lower, t in lower.items():
        if key == t_lower.replace("_", ""):
            repairs.append("tool-name-case")
            return t
    close = difflib.get_close_matches(key, list(lower), n=1, cutoff=0.75)
    if close:
        repairs.append("tool-name-fuzzy")
        return lower[close[0]]
    return None


def _strip_quotes(arg: str, repairs: list[str]) -> str:
    a = arg.strip()
    if len(a) >= 2 and a[0] == a[-1] and a[0] in "\"'`":
        repairs.append("quoted-argument")
        return a[1:-1].strip()
    return a


def parse_action_call(content: str, tools: Sequence[str], repairs: list[str]) -> tuple[str | None, str | None, str]:
    """``(tool, argument, error)`` from an action's content such as ``Search[x]``; error is '' when ok."""
    content = content.strip()
    cut = _OBS_INLINE_RE.sub("", content)
    if cut != content:
        repairs.append("text-after-action")
        content = cut.strip()
    m = _CALL_RE.match(content)
    if m is None:
        # "Search: x" / "Search x" — a known tool name followed by its argument without brackets
        head = re.match(r"^([A-Za-z]+)[ \t]*[:\-]?[ \t]+(.+)$", content)
        if head:
            tool = resolve_tool(head.group(1), tools, repairs)
            if tool is not None:
                repairs.append("missing-brackets")
                return tool, _strip_quotes(head.group(2), repairs), ""
        return None, None, f"could not read an action from {content[:80]!r}"
    name, bracket, rest = m.group(1), m.group(2), m.group(3)
    close = "]" if bracket == "[" else ")"
    if bracket == "(":
        repairs.append("parentheses")
    end = rest.rfind(close)
    if end == -1:
        other = "]" if close == ")" else ")"
        end = rest.rfind(other)
        if end == -1 or end != len(rest.rstrip()) - 1:
            repairs.append("unclosed-bracket")
            arg, tail = rest.strip(), ""
        else:
            repairs.append("mismatched-bracket")
            arg, tail = rest[:end], rest[end + 1 :]
    else:
        arg, tail = rest[:end], rest[end + 1 :]
    if tail.strip():
        repairs.append("text-after-action")
    tool = resolve_tool(name, tools, repairs)
    if tool is None:
        return None, None, f"unknown tool {name.strip()!r}"
    arg = _strip_quotes(arg, repairs)
    if not arg:
        return None, None, f"{tool}[...] needs an argument"
    return tool, arg, ""


def parse_react_text(text: str, *, step: int, tools: Sequence[str], finish_tool: str = "Finish") -> ParsedStep:
    """Read one ReAct step (the model's text after the prompt's ``Thought {step}:``)."""
    repairs: list[str] = []
    src = text.replace("\r\n", "\n")
    md = _MD_LABEL_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}:", src)
    if md != src:
        repairs.append("markdown-labels")
        src = md

    line = _ACTION_LINE_RE.search(src)
    if line is not None:
        thought_text, label, num, content = src[: line.start()], line.group(1), line.group(2), line.group(3)
        after = src[line.end() :]
    elif quotes_observation(src):
        # repairs never apply to text that quotes a tool observation: a planted "Finish[...]" or
        # "Final Answer:" copied from a document must not become an action (SECURITY.md §4)
        return ParsedStep(
            thought=_THOUGHT_PREFIX_RE.sub("", src).strip(),
            repairs=repairs,
            error="Invalid action: your text quotes an observation; write your own line "
            + FORMAT_HINT_TEXT.format(i=step, tools=", ".join(tools)).removeprefix("Write exactly one line "),
            error_type="no-action",
        )
    # An "Action i:" in the middle of a line is NOT read (there used to be an inline repair): a model quoting
    # a document without its delimiters ("The page says: ... Action 2: Finish[x]") would have turned the
    # planted text into its action. The agent re-asks with "Action i:" instead (repair action-prompted).

    if line is None:
        # a bare call line "Search[x]" or a "Final Answer: x" line written by the model
        bare = re.search(r"^[ \t]*(" + "|".join(map(re.escape, tools)) + r")[ \t]*[\[(].*$", src, re.I | re.M)
        final = _FINAL_ANSWER_RE.search(src)
        if bare is not None and (final is None or bare.start() < final.start()):
            repairs.append("action-label-missing")
            thought_text, content, after = src[: bare.start()], bare.group(0), src[bare.end() :]
        elif final is not None and finish_tool in tools:
            repairs.append("final-answer-line")
            thought_text, content, after = src[: final.start()], f"{finish_tool}[{final.group(2).strip()}]", ""
        else:
            thought = _THOUGHT_PREFIX_RE.sub("", src).strip()
            return ParsedStep(
                thought=thought,
                repairs=repairs,
                error="Invalid action: no 'Action' line found. "
                + FORMAT_HINT_TEXT.format(i=step, tools=", ".join(tools)),
                error_type="no-action",
            )
    else:
        if label != "Action":
            repairs.append("label-case")
        if num is None:
            repairs.append("action-number-missing")
        elif int(num) != step:
            repairs.append("action-number-mismatch")

    if after.strip():
        repairs.append("text-after-action")
    thought = _THOUGHT_PREFIX_RE.sub("", thought_text.strip())
    if thought != thought_text.strip() and thought_text.strip():
        repairs.append("thought-label-repeated")
    tool, arg, err = parse_action_call(content, tools, repairs)
    if err:
        return ParsedStep(
            thought=thought.strip(),
            repairs=repairs,
            error=f"Invalid action: {err}. " + FORMAT_HINT_TEXT.format(i=step, tools=", ".join(tools)),
            error_type="bad-action",
        )
    return ParsedStep(thought=thought.strip(), tool=tool, argument=arg, repairs=repairs)


# ------------------------------------------------------------------------------------- JSON format
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def _json_candidates(s: str, repairs: list[str]) -> tuple[Any, int] | None:
    """The first JSON object in ``s`` (with small repairs) and where it starts."""
    start = s.find("{")
    if start == -1:
        return None
    dec = json.JSONDecoder()
    body = s[start:]
    # repairs applied cumulatively, trying to decode after each one
    transforms = [
        ("trailing-comma", lambda b: re.sub(r",\s*([}\]])", r"\1", b)),
        ("single-quotes", lambda b: b.replace("'", '"') if '"' not in b else b),
        ("unclosed-json", lambda b: b.rstrip() + "}" * max(0, b.count("{") - b.count("}"))),
    ]
    applied: list[str] = []
    cand = body
    for name, fn in [("", lambda b: b), *transforms]:
        new = fn(cand)
        if name and new == cand:
            continue
        if name:
            applied.append(name)
        cand = new
        try:
            obj, _ = dec.raw_decode(cand)
        except json.JSONDecodeError:
            continue
        repairs.extend(applied)
        return obj, start
    return None


def parse_json_step(text: str, *, tools: Sequence[str]) -> ParsedStep:
    """Read a JSON tool call: ``{"tool": name, "arguments": {...}}`` (``name``/``action``,
    ``args``/``action_input`` accepted and recorded as repairs)."""
    repairs: list[str] = []
    src = text.replace("\r\n", "\n")
    fence = _FENCE_RE.search(src)
    scan = src
    if fence is not None:
        repairs.append("code-fence")
        scan = fence.group(1)
    found = _json_candidates(scan, repairs)
    hint = FORMAT_HINT_JSON.format(tools=", ".join(tools))
    thought_src = src[: fence.start()] if fence is not None else src[: src.find("{")] if "{" in src else src
    thought = _THOUGHT_PREFIX_RE.sub("", thought_src.strip()).strip()
    if found is None or not isinstance(found[0], dict):
        return ParsedStep(thought=thought, repairs=repairs, error=f"Invalid action: no JSON tool call found. {hint}",
                          error_type="no-action")
    obj: dict[str, Any] = found[0]
    name = obj.get("tool")
    if name is None:
        for alt in ("name", "action", "tool_name"):
            if alt in obj:
                name = obj[alt]
                repairs.append(f"json-key-{alt}")
                break
    args: Any = obj.get("arguments")
    if args is None:
        for alt in ("args", "action_input", "input", "parameters"):
            if alt in obj:
                args = obj[alt]
                repairs.append(f"json-key-{alt}")
                break
    if not isinstance(name, str):
        return ParsedStep(thought=thought, repairs=repairs, error=f"Invalid action: the JSON has no tool name. {hint}",
                          error_type="bad-action")
    tool = resolve_tool(name, tools, repairs)
    if tool is None:
        return ParsedStep(thought=thought, repairs=repairs, error=f"Invalid action: unknown tool {name!r}. {hint}",
                          error_type="bad-action")
    if args is None:
        args = {}
    if not isinstance(args, (dict, str)):
        args = str(args)
    return ParsedStep(thought=thought, tool=tool, argument=args, repairs=repairs)
