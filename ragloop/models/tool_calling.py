"""Tool calling and structured output over any policy: OpenAI-style ``tools`` / ``tool_choice`` /
``response_format`` → a prompt the model can follow, a ``GrammarSpec`` that forces a valid answer, and the
parser that turns the generated text back into tool calls.

One format is used everywhere (the server, the LangChain chat model): a call is the JSON object
``{"name": TOOL, "arguments": {...}}``, optionally wrapped in ``<tool_call>…</tool_call>`` (the Hermes/Qwen
convention; both are parsed). When a call is required (``tool_choice="required"`` or a named tool) the
decode is constrained by a JSON-schema grammar (``GrammarSpec(kind="json_schema")``, compiled by
``ragloop.models.grammar``), so even a 135M model emits a call that parses and matches the tool's
parameter schema — the approach of grammar-constrained decoding (Willard & Louf 2023, "Efficient Guided
Generation for LLMs"; Geng et al. 2023). With ``tool_choice="auto"`` the model decides freely and text that
parses as a call to an offered tool becomes a call.

Example::

    >>> tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object",
    ...     "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    >>> plan = plan_tools(tools, "required")
    >>> plan.grammar.kind, plan.force
    ('json_schema', True)
    >>> parse_tool_calls('{"name": "add", "arguments": {"a": 2}}', plan.names)
    [ToolCallText(name='add', arguments='{"a": 2}')]
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ragloop.core.errors import UsageError
from ragloop.models.types import GrammarSpec

# compact one-line JSON (llguidance's "x-guidance" options; other JSON-schema engines ignore unknown keys):
# free whitespace lets a small model spend its whole token budget on blanks inside a valid object
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CALL_FORMAT = '{"name": "<tool name>", "arguments": {<arguments as the tool\'s JSON schema says>}}'
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCallText:
    """One parsed call: the tool's name and its arguments as a JSON string (OpenAI's wire form)."""

    name: str
    arguments: str


@dataclass
class ToolPlan:
    """What a request's ``tools`` + ``tool_choice`` mean for one decode."""

    tools: list[dict[str, Any]] = field(default_factory=list)  # {"name", "description", "parameters"}
    force: bool = False  # a call is required: decode under ``grammar``
    grammar: GrammarSpec | None = None
    instructions: str = ""  # appended to the system prompt ("" when no tools are offered)

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tools]


def _function_of(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise UsageError(f"tools[{i}] must be an object, got {type(tool).__name__}")
    fn = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise UsageError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise UsageError(f"tools[{i}].function.parameters must be a JSON schema object")
    return {"name": fn["name"], "description": str(fn.get("description") or ""), "parameters": params}


def grammar_for_schema(schema: dict[str, Any], name: str) -> GrammarSpec:
    """A JSON-schema ``GrammarSpec`` for ``schema`` that asks for compact one-line JSON (``JSON_STYLE``)."""
    return GrammarSpec("json_schema", json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False), name=name)


def call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call to any of ``tools``: ``{"name": const, "arguments": <parameters>}``."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def tools_instructions(tools: Sequence[dict[str, Any]], *, force: bool) -> str:
    """The text that tells the model which tools exist and how to call one."""
    lines = ["You can call these tools:"]
    for t in tools:
        desc = f": {t['description']}" if t["description"] else ""
        lines.append(f"- {t['name']}{desc} Arguments (JSON schema): {json.dumps(t['parameters'], ensure_ascii=False)}")
    how = "Call one now" if force else "To call a tool"
    lines.append(f"{how}, answering with only this JSON object: {CALL_FORMAT}")
    return "\n".join(lines)


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any = None) -> ToolPlan:
    """Map OpenAI ``tools`` and ``tool_choice`` ("none" | "auto" | "required" | {"type": "function",
    "function": {"name": ...}}) to a ``ToolPlan``; a bad value is a UsageError naming it."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise UsageError("tool_choice needs tools: the request has none")
        return ToolPlan()
    fns = [_function_of(t, i) for i, t in enumerate(tools)]
    names = [f["name"] for f in fns]
    if len(set(names)) != len(names):
        raise UsageError(f"tool names must be unique, got {names}")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        return ToolPlan(tools=fns, instructions=tools_instructions(fns, force=False))
    if choice in ("required", "any"):
        chosen = fns
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        name = choice["function"]["name"]
        chosen = [f for f in fns if f["name"] == name]
        if not chosen:
            raise UsageError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})")
    else:
        raise UsageError(
            f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
            f"got {choice!r}"
        )
    label = "json:" + (chosen[0]["name"] if len(chosen) == 1 else "tool_call")
    return ToolPlan(
        tools=chosen,
        force=True,
        grammar=grammar_for_schema(call_schema(chosen), label),
        instructions=tools_instructions(chosen, force=True),
    )


def response_format_grammar(response_format: Any) -> tuple[GrammarSpec | None, str]:
    """OpenAI ``response_format`` → (grammar, instruction for the prompt). ``{"type": "text"}`` → no grammar;
    ``json_object`` → any JSON object; ``json_schema`` → that schema."""
    if response_format is None:
        return None, ""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return grammar_for_schema({"type": "object"}, "json_object"), "Answer with a JSON object."
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise UsageError("response_format.json_schema.schema must be a JSON schema object")
        name = str(spec.get("name") or "schema")
        text = json.dumps(schema, ensure_ascii=False)
        return (grammar_for_schema(schema, f"json:{name}"),
                f"Answer with only a JSON object that matches this JSON schema: {text}")
    raise UsageError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def add_system_text(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``messages`` with ``text`` appended to the first system message (or a new one in front)."""
    if not text:
        return messages
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def _json_objects(text: str) -> list[Any]:
    """Every JSON value that starts at a ``{`` in ``text`` and parses (outermost first)."""
    dec = json.JSONDecoder()
    found, i = [], text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        found.append(obj)
        i = text.find("{", end)
    return found


def parse_tool_calls(text: str, names: Sequence[str]) -> list[ToolCallText]:
    """Calls to tools named in ``names`` found in ``text`` (JSON objects ``{"name", "arguments"}``, bare or
    in ``<tool_call>`` tags); ``[]`` when there are none. ``"parameters"`` is accepted for ``"arguments"``."""
    if not names:
        return []
    tagged = _TAGGED.findall(text)
    candidates = [o for chunk in tagged for o in _json_objects(chunk)] if tagged else _json_objects(text)
    calls = []
    for obj in candidates:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models emit the arguments already serialised
            try:
                args = json.loads(args)
            except ValueError:
                continue
        if not isinstance(args, dict):
            continue
        calls.append(ToolCallText(name=str(obj["name"]), arguments=json.dumps(args, ensure_ascii=False)))
    return calls


def call_text(name: str, arguments: Any) -> str:
    """An earlier call as the model writes it (for assistant messages in the history)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
