"""Typed tools and the per-agent tool registry.

A ``Tool`` is a name, a description written for the model, a pydantic model of its arguments and a
function. Tools are built from type-hinted functions (``tool_from_function``, in the manner of
smolagents' ``@tool``) and registered on one agent (``ToolRegistry``) — never globally — so the set of
actions reachable from an agent loop is an explicit allow-list (SECURITY.md §4).

A tool never raises into the agent loop for a model-caused problem: bad arguments and failures come back
as ``ToolResult(ok=False, output="Error: …")``, an observation the model can act on (STYLE.md).

Built-in tools here: ``calculator`` (safe AST arithmetic), ``python`` (the PAL sandbox), ``finish``.
Search and lookup over a retriever live in ``ragloop.agents.docsearch``.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ragloop.agents.calculator import CalculatorError, evaluate, format_number
from ragloop.core.errors import UsageError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")


@dataclass
class ToolResult:
    """What a tool returns to the loop: the observation text and structured extras."""

    ok: bool
    output: str
    value: Any = None
    error_type: str | None = None
    retrieved_ids: list[str] = field(default_factory=list)
    finish: bool = False  # the finish tool: ``output`` is the final answer


class Tool:
    """A callable tool with a pydantic argument schema.

    ``main_arg`` names the argument filled by the bracket syntax of ReAct (``Search[query]``). ``reset``
    (optional) clears per-run state, e.g. the current document of lookup.
    """

    def __init__(
        self,
        name: str,
        description: str,
        args_model: type[BaseModel],
        fn: Callable[..., Any],
        *,
        main_arg: str | None = None,
        reset: Callable[[], None] | None = None,
    ) -> None:
        if not _NAME_RE.match(name):
            raise UsageError(f"tool name {name!r} must be a letter followed by letters, digits or '_'")
        fields = list(args_model.model_fields)
        if main_arg is None and fields:
            main_arg = fields[0]
        if main_arg is not None and main_arg not in fields:
            raise UsageError(f"tool {name}: main_arg {main_arg!r} is not one of its arguments {fields}")
        self.name = name
        self.description = description.strip()
        self.args_model = args_model
        self.fn = fn
        self.main_arg = main_arg
        self._reset = reset

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    @property
    def schema(self) -> dict[str, Any]:
        """JSON schema of the arguments (for the JSON tool-call format)."""
        return self.args_model.model_json_schema()

    def reset(self) -> None:
        if self._reset is not None:
            self._reset()

    def bind(self, arguments: dict[str, Any] | str) -> dict[str, Any]:
        """Arguments as a dict: a bare string fills ``main_arg`` (or is parsed as a JSON object)."""
        if isinstance(arguments, dict):
            return arguments
        text = arguments.strip()
        if text.startswith("{") and len(self.args_model.model_fields) > 1:
            try:
                parsed = json.loads(text)
                if isinstance(parsed, dict):
                    return parsed
            except json.JSONDecodeError:
                pass
        if self.main_arg is None:
            return {}
        return {self.main_arg: arguments}

    def __call__(self, arguments: dict[str, Any] | str) -> ToolResult:
        try:
            args = self.args_model.model_validate(self.bind(arguments))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "arguments"
            return ToolResult(False, f"Error: invalid arguments for {self.name} ({where}: {first['msg']})",
                              error_type="invalid-arguments")
        try:
            out = self.fn(**args.model_dump())
        except (UsageError, ValueError, ArithmeticError, LookupError, TypeError) as e:
            log.debug("tool %s failed: %s", self.name, e)
            return ToolResult(False, f"Error: {e}", error_type=type(e).__name__)
        if isinstance(out, ToolResult):
            return out
        return ToolResult(True, out if isinstance(out, str) else json.dumps(out, default=str), value=out)


def _doc_summary(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def tool_from_function(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
) -> Tool:
    """A Tool from a type-hinted function: every parameter needs an annotation; defaults are kept.

    >>> def add(a: int, b: int = 1) -> int:
    ...     '''Add two integers.'''
    ...     return a + b
    >>> tool_from_function(add)({"a": 2}).output
    '3'
    """
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    fields: dict[str, Any] = {}
    for pname, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise UsageError(f"tool {fn.__name__}: *args/**kwargs are not supported; name each argument")
        if pname not in hints:
            raise UsageError(f"tool {fn.__name__}: parameter {pname!r} needs a type annotation")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (hints[pname], default)
    tool_name = name or fn.__name__
    model = create_model(  # type: ignore[call-overload]
        f"{tool_name.title().replace('_', '')}Args", __config__=ConfigDict(extra="forbid"), **fields
    )
    desc = description or _doc_summary(fn) or f"the {tool_name} tool"
    return Tool(tool_name, desc, model, fn)


class ToolRegistry:
    """The tools of one agent, looked up by case-insensitive name."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, tool: Tool | Callable[..., Any]) -> Tool:
        if not isinstance(tool, Tool):
            tool = tool_from_function(tool)
        key = tool.name.lower()
        if key in self._tools:
            raise UsageError(f"a tool named {tool.name!r} is already registered on this agent")
        self._tools[key] = tool
        return tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name.lower())

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tools.values()]

    def reset(self) -> None:
        for t in self._tools.values():
            t.reset()


# ------------------------------------------------------------------------------------- built-ins
class _ExprArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expression: str


class _CodeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str


class _AnswerArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str


def calculator_tool() -> Tool:
    """``Calculator[3 * (4 + 5)]`` → ``27``; safe AST arithmetic, never ``eval``."""

    def run(expression: str) -> ToolResult:
        try:
            value = evaluate(expression)
            return ToolResult(True, format_number(value), value=value)
        except CalculatorError as e:
            return ToolResult(False, f"Error: {e.message}", error_type="calculator-error")

    return Tool(
        "Calculator",
        "evaluates an arithmetic expression such as 3 * (4 + 5) / 2 and returns the number.",
        _ExprArgs,
        run,
    )


def python_tool(sandbox: Any) -> Tool:
    """``Python[code]``: runs a program in the sandbox; the answer is ``solution()``'s return value (or
    the printed output when the program defines no ``solution``)."""

    def run(code: str) -> ToolResult:
        entry = "solution" if re.search(r"^\s*def\s+solution\s*\(", code, re.M) else None
        res = sandbox.run(code, entry=entry)
        if res.ok:
            shown = res.value if res.value is not None else (res.stdout or "").strip()
            return ToolResult(True, str(shown), value=res.value)
        return ToolResult(False, f"Error: {res.error_type}: {res.message}", error_type=res.error_type)

    return Tool(
        "Python",
        "runs a short Python program (no imports except math; define solution() and return the result).",
        _CodeArgs,
        run,
    )


def finish_tool() -> Tool:
    """``Finish[answer]``: ends the run with ``answer``."""
    return Tool(
        "Finish",
        "returns the answer and finishes the task.",
        _AnswerArgs,
        lambda answer: ToolResult(True, answer.strip(), value=answer.strip(), finish=True),
    )
