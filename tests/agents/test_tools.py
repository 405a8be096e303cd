"""Typed tools, the per-agent registry, the safe calculator, search/lookup, and the python tool."""

from __future__ import annotations

import pytest
from agent_helpers import CORPUS

from ragloop.agents.calculator import CalculatorError, evaluate, format_number, normalize_expression
from ragloop.agents.docsearch import DocumentState, KeywordBackend, document_tools, split_sentences
from ragloop.agents.tools import ToolRegistry, calculator_tool, finish_tool, python_tool, tool_from_function
from ragloop.core.errors import UsageError


@pytest.mark.parametrize(
    "expr, value",
    [("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3), ("-3 ** 2", -9), ("2 ** 10", 1024),
     ("$1,200 - 200", 1000), ("5 x 3", 15), ("6 × 7", 42), ("10 ÷ 4", 2.5), ("2^3", 8), ("15% * 200", 30),
     ("sqrt(16) + abs(-2)", 6), ("round(2.567, 2)", 2.57), ("max(3, 9, 4)", 9), ("3 + 4 =", 7)],
)
def test_calculator_values(expr, value):
    assert evaluate(expr) == pytest.approx(value)


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('id')", "open('/etc/passwd')", "().__class__", "x + 1", "10**10**10",
     "9**99999", "'a' * 3", "[1, 2]", "lambda: 1", "1/0", "", "1" * 400, "eval('1')", "(1).real",
     "2 ** 100000", "99999999999999999999**9999"],
)
def test_calculator_rejects(expr):
    with pytest.raises(CalculatorError):
        evaluate(expr)


def test_normalize_and_format():
    assert normalize_expression("$1,200 × 3 ^ 2") == "1200 * 3 ** 2"
    assert format_number(4.0) == "4" and format_number(1 / 3) == "0.333333" and format_number(1234567.5) == "1234567.5"


def test_calculator_tool_errors_are_observations():
    t = calculator_tool()
    assert t("2 + 2").output == "4"
    bad = t("import os")
    assert not bad.ok and bad.output.startswith("Error:") and bad.error_type == "calculator-error"


def test_tool_from_function_schema_and_validation():
    def convert(amount: float, rate: float = 1.1) -> float:
        """Converts an amount with a rate.

        Longer text that is not part of the description."""
        return amount * rate

    t = tool_from_function(convert)
    assert t.name == "convert" and t.description == "Converts an amount with a rate." and t.main_arg == "amount"
    assert set(t.schema["properties"]) == {"amount", "rate"}
    assert t({"amount": 10, "rate": 2}).output == "20.0"
    assert t("3").value == pytest.approx(3.3)  # bracket text fills the main argument
    bad = t({"amount": "lots"})
    assert not bad.ok and bad.error_type == "invalid-arguments" and "amount" in bad.output
    extra = t({"amount": 1, "evil": 2})
    assert not extra.ok


def test_tool_from_function_needs_annotations():
    def f(x):
        return x

    with pytest.raises(UsageError, match="annotation"):
        tool_from_function(f)


def test_tool_exceptions_become_observations():
    def boom(x: str) -> str:
        """Fails."""
        raise ValueError("nope")

    r = tool_from_function(boom)("a")
    assert not r.ok and r.output == "Error: nope"


def test_registry_is_per_agent_and_rejects_duplicates():
    a, b = ToolRegistry([calculator_tool()]), ToolRegistry()
    assert "calculator" in a and "calculator" not in b
    with pytest.raises(UsageError, match="already registered"):
        a.register(calculator_tool())
    assert a.get("CALCULATOR").name == "Calculator"


def test_finish_tool():
    r = finish_tool()(" 42 ")
    assert r.finish and r.output == "42"


def test_search_and_lookup_like_the_paper():
    search, lookup = document_tools(KeywordBackend(CORPUS))
    assert lookup("x").error_type == "no-document"
    r = search("nucleus sampling probability")
    assert r.ok and r.retrieved_ids[0] == "nucleus" and r.output.startswith("(Nucleus sampling) Nucleus")
    assert lookup("set").output == "(Result 1 / 2) Nucleus sampling keeps the smallest set of tokens whose probability reaches p."
    assert lookup("set").output == "(Result 2 / 2) The set changes size at every step."
    assert lookup("set").output == "No more results."
    assert lookup("Holtzman").output.startswith("(Result 1 / 1) It was introduced by Holtzman")
    assert search("zzz qqq").error_type == "no-results"


def test_search_cuts_are_stated():
    search, _ = document_tools(KeywordBackend({"a": "word " * 500}), max_chars=50)
    out = search("word").output
    assert out.endswith("more characters]") and len(out) < 120


def test_split_sentences():
    assert split_sentences("A b. C d! e") == ["A b.", "C d! e"]
    assert split_sentences("Dr. smith went. 3 cats") == ["Dr. smith went.", "3 cats"]


def test_document_state_reset():
    s = DocumentState(doc_id="x", text="t", keyword="k", results=["r"], cursor=1)
    s.reset()
    assert s == DocumentState()


def test_python_tool_runs_in_the_real_sandbox():
    from ragloop.agents.sandbox import Sandbox, SandboxLimits

    tool = python_tool(Sandbox(SandboxLimits(wall_seconds=10)))
    ok = tool("def solution():\n    return 6 * 7\n")
    assert ok.ok and ok.output == "42"
    bad = tool("def solution():\n    return open('/etc/passwd').read()\n")
    assert not bad.ok and bad.error_type == "validation"
