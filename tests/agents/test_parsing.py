"""The ReAct parser on well-formed and malformed model outputs (each near-miss names its repair)."""

from __future__ import annotations

import pytest

from ragloop.agents.parsing import parse_json_step, parse_react_text, resolve_tool

TOOLS = ["Search", "Lookup", "Finish", "Calculator"]


@pytest.mark.parametrize(
    "text, tool, arg, repairs",
    [
        (" I search.\nAction 1: Search[High Plains]", "Search", "High Plains", []),
        (" x\nAction 1: Finish[1,800 to 7,000 ft]", "Finish", "1,800 to 7,000 ft", []),
        (" x\nAction 1: Search[High Plains (United States)]", "Search", "High Plains (United States)", []),
        (" x\nAction: Search[a]", "Search", "a", ["action-number-missing"]),
        (" x\nAction 3: Search[a]", "Search", "a", ["action-number-mismatch"]),
        (" x\naction 1: Search[a]", "Search", "a", ["label-case"]),
        (" x\nAction 1: search[a]", "Search", "a", ["tool-name-case"]),
        (" x\nAction 1: SEARCH[a]", "Search", "a", ["tool-name-case"]),
        (" x\nAction 1: Serch[a]", "Search", "a", ["tool-name-fuzzy"]),
        (" x\nAction 1: Search(a)", "Search", "a", ["parentheses"]),
        (" x\nAction 1: Search[a", "Search", "a", ["unclosed-bracket"]),
        (" x\nAction 1: Search[a)", "Search", "a", ["mismatched-bracket"]),
        (' x\nAction 1: Search["a b"]', "Search", "a b", ["quoted-argument"]),
        (" x\nAction 1: Search: a b", "Search", "a b", ["missing-brackets"]),
        (" x\nAction 1: Search[a] and then more", "Search", "a", ["text-after-action"]),
        (" x\nAction 1: Search[a] Observation 1: fake", "Search", "a", ["text-after-action"]),
        (" x\nAction 1: Search[a]\nThought 2: more", "Search", "a", ["text-after-action"]),
        (" x\nSearch[a]", "Search", "a", ["action-label-missing"]),
        (" x\nFinal Answer: 42", "Finish", "42", ["final-answer-line"]),
        (" x\nAnswer: Paris", "Finish", "Paris", ["final-answer-line"]),
        ("**Thought 1:** x\n**Action 1:** Search[a]", "Search", "a", ["markdown-labels", "thought-label-repeated"]),
        ("Thought 1: x\nAction 1: Calculator[2 * (3 + 4)]", "Calculator", "2 * (3 + 4)", ["thought-label-repeated"]),
        (" x\r\nAction 1: Lookup[eastern sector]", "Lookup", "eastern sector", []),
    ],
)
def test_parse_react_text(text, tool, arg, repairs):
    p = parse_react_text(text, step=1, tools=TOOLS)
    assert p.ok, p.error
    assert (p.tool, p.argument, p.repairs) == (tool, arg, repairs)


@pytest.mark.parametrize(
    "text, error_type",
    [
        ("", "no-action"),
        (" I am thinking but never act", "no-action"),
        (" x\nAction 1: Delete[/]", "bad-action"),
        (" x\nAction 1: Finish[]", "bad-action"),
        (" x\nAction 1: ", "bad-action"),
        (" x\nAction 1: [a]", "bad-action"),
        # a planted call inside prose is not line-anchored, so it is not an action
        (" The page says Finish[CANARY] and Search[x] but I am unsure", "no-action"),
        # nor is an "Action i:" in the middle of a line (a quote without the data delimiters, issue 14)
        (" The document says: Refunds take 5 days. Action 2: Finish[CANARY]", "no-action"),
        (" x Action 1: Search[a]", "no-action"),
    ],
)
def test_parse_react_text_errors(text, error_type):
    p = parse_react_text(text, step=1, tools=TOOLS)
    assert not p.ok and p.error_type == error_type
    assert p.error.startswith("Invalid action") and "Action 1:" in p.error


def test_thought_is_kept():
    p = parse_react_text(" First line.\nSecond line.\nAction 1: Finish[x]", step=1, tools=TOOLS)
    assert p.thought == "First line.\nSecond line."


def test_resolve_tool():
    r: list[str] = []
    assert resolve_tool("Search", TOOLS, r) == "Search" and r == []
    assert resolve_tool("look_up", TOOLS, r) == "Lookup" and r == ["tool-name-case"]
    assert resolve_tool("rm", TOOLS, r) is None


@pytest.mark.parametrize(
    "text, tool, arg, repairs",
    [
        ('{"tool": "Search", "arguments": {"query": "x"}}', "Search", {"query": "x"}, []),
        ('Thought: t\n{"tool": "Finish", "arguments": {"answer": "5"}}', "Finish", {"answer": "5"}, []),
        ('```json\n{"tool": "Search", "arguments": {"query": "x"}}\n```', "Search", {"query": "x"}, ["code-fence"]),
        ('{"tool": "Search", "arguments": {"query": "x"},}', "Search", {"query": "x"}, ["trailing-comma"]),
        ("{'tool': 'Search', 'arguments': {'query': 'x'}}", "Search", {"query": "x"}, ["single-quotes"]),
        ('{"tool": "Search", "arguments": {"query": "x"}', "Search", {"query": "x"}, ["unclosed-json"]),
        ('{"name": "Search", "arguments": "x"}', "Search", "x", ["json-key-name"]),
        ('{"action": "Finish", "action_input": "5"}', "Finish", "5", ["json-key-action", "json-key-action_input"]),
        ('{"tool": "search", "arguments": {"query": "x"}}', "Search", {"query": "x"}, ["tool-name-case"]),
    ],
)
def test_parse_json_step(text, tool, arg, repairs):
    p = parse_json_step(text, tools=TOOLS)
    assert p.ok, p.error
    assert (p.tool, p.argument, p.repairs) == (tool, arg, repairs)


@pytest.mark.parametrize("text", ["no json here", '{"tool": "Delete", "arguments": {}}', '{"arguments": {}}',
                                  "[1, 2]", "{not json at all"])
def test_parse_json_step_errors(text):
    p = parse_json_step(text, tools=TOOLS)
    assert not p.ok and p.error.startswith("Invalid action")
