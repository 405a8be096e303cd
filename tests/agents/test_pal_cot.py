"""PAL (program extraction, sandboxed execution) and CoT (prompts, answer parsing, self-consistency)."""

from __future__ import annotations

import pytest
from agent_helpers import check_golden

from ragloop.agents.base import canonical_answer, majority_vote
from ragloop.agents.cot import FEVER_FORMAT, CoTAgent, CoTConfig, build_cot_prompt, parse_answer
from ragloop.agents.pal import PALAgent, PALConfig, extract_program, format_value, join_prefill
from ragloop.agents.prompts import Exemplar
from ragloop.agents.sandbox import Sandbox, SandboxLimits
from ragloop.core.errors import UsageError
from ragloop.models.scripted import ScriptedPolicy


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(wall_seconds=10))


# ------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize(
    "text, program, repairs",
    [
        ("def solution():\n    return 2\n", "def solution():\n    return 2\n", []),
        ("def solution():\n    a = 1\n\n    return a\n\n\nprint(solution())",
         "def solution():\n    a = 1\n\n    return a\n", ["text-outside-program"]),
        ("Here:\n```python\ndef solution():\n    return 3\n```\nThat's it.",
         "def solution():\n    return 3\n", ["code-fence", "text-outside-program"]),
        ("```\ndef solution():\n    return 3", "def solution():\n    return 3\n", ["code-fence"]),
        ("def solution():\n    result = 5\n", "def solution():\n    result = 5\n    return result\n", ["added-return"]),
        ("def answer():\n    return 4\n", "def solution():\n    return 4\n", ["renamed-function"]),
        ("def helper(x):\n    return x * 2\ndef solution():\n    return helper(2)\n",
         "def helper(x):\n    return x * 2\ndef solution():\n    return helper(2)\n", []),
        ("def solution():\n\treturn 1\n", "def solution():\n    return 1\n", []),
    ],
)
def test_extract_program(text, program, repairs):
    assert extract_program(text) == (program, repairs)


@pytest.mark.parametrize("text", ["", "The answer is 5.", "x = 5\nprint(x)", "def a():\n  return 1\ndef b():\n  return 2"])
def test_extract_program_none(text):
    assert extract_program(text)[0] is None


def test_format_value():
    assert [format_value(v) for v in (18.0, 2.5, 7, None, [3.0], "x")] == ["18", "2.5", "7", None, "3", "x"]


# ------------------------------------------------------------------------------------------- PAL
def test_golden_pal_raw_prefill(sandbox):
    # with prefill the prompt ends with the signature and docstring; the model writes the body
    policy = ScriptedPolicy(["\n    pens = 18\n    cost = pens / 3 * 2\n    result = cost\n    return result\n\n\n\nQ: next"])
    trace = PALAgent(policy, PALConfig(shots=2), sandbox=sandbox).run(
        "A store sells pens at 3 for $2. How much do 18 pens cost?")
    assert trace.answer == "12" and trace.finished
    assert policy.prompts[0].endswith('def solution():\n    """A store sells pens at 3 for $2. How much do 18 pens cost?"""')
    assert policy.prompts[0].startswith("Q: Olivia has $23.")
    assert trace.steps[0].code.startswith("def solution():\n    \"\"\"A store")
    assert "\n\n\n" in policy.calls[0].cfg.stop and "Q: next" not in trace.steps[0].raw_output
    check_golden("pal_raw", trace)


def test_pal_body_without_newline_after_docstring_is_repaired(sandbox):
    # a model that writes the indented body right after the docstring's quotes (no newline): the program is
    # assembled with the newline and the repair is recorded, so strict format validity still sees it
    policy = ScriptedPolicy(["    pens = 18\n    result = pens / 3 * 2\n    return result\n\n\n"])
    trace = PALAgent(policy, PALConfig(shots=0), sandbox=sandbox).run(
        "A store sells pens at 3 for $2. How much do 18 pens cost?")
    assert trace.answer == "12" and trace.finished
    assert trace.steps[0].repairs == ["newline-after-docstring"]
    assert '"""\n    pens = 18\n' in trace.steps[0].code


@pytest.mark.parametrize("prefill, text, joined, repairs", [
    ('def solution():\n    """Q"""', "\n    x = 1", 'def solution():\n    """Q"""\n    x = 1', []),
    ('def solution():\n    """Q"""', "    x = 1", 'def solution():\n    """Q"""\n    x = 1', ["newline-after-docstring"]),
    ('def solution():\n    """Q"""', "   \n    x = 1", 'def solution():\n    """Q"""   \n    x = 1', []),
    ("```\ndef solution():\n", "    x = 1", "```\ndef solution():\n    x = 1", []),
    ('def solution():\n    """Q"""', "", 'def solution():\n    """Q"""', []),
])
def test_join_prefill(prefill, text, joined, repairs):
    assert join_prefill(prefill, text) == (joined, repairs)


def test_pal_chat_style(sandbox):
    policy = ScriptedPolicy(["```\ndef solution():\n    return 3 * 4\n```"])
    trace = PALAgent(policy, PALConfig(prompt_style="chat", shots=3, prefill=False), sandbox=sandbox).run(
        "What is 3 times 4?")
    assert trace.answer == "12" and trace.steps[0].repairs == ["code-fence"]
    assert [m.role for m in trace.messages] == ["system", "user", "assistant"]
    assert "Here are 3 examples" in trace.messages[1].content and trace.messages[1].content.endswith("Q: What is 3 times 4?")


def test_pal_chat_style_with_prefill(sandbox):
    policy = ScriptedPolicy(["\n    return 3 * 4\n```\nDone"])
    trace = PALAgent(policy, PALConfig(prompt_style="chat", shots=1), sandbox=sandbox).run("What is 3 times 4?")
    assert policy.prompts[0].endswith('<|im_start|>assistant\n```\ndef solution():\n    """What is 3 times 4?"""')
    assert trace.answer == "12" and trace.messages[-1].content.startswith("```\ndef solution():")
    assert "\n```" in policy.calls[0].cfg.stop


@pytest.mark.parametrize(
    "body, error_type",
    [("\n    return open('/etc/passwd').read()", "validation"),
     ("\n    import os\n    return os.getcwd()", "validation"),
     ("\n    return 1 / 0", "runtime"),
     ("\n    while True:\n        pass", "timeout")],
)
def test_pal_errors_are_recorded(body, error_type):
    sb = Sandbox(SandboxLimits(wall_seconds=2, cpu_seconds=2))
    trace = PALAgent(ScriptedPolicy([body]), PALConfig(shots=0), sandbox=sb).run("q?")
    assert trace.answer is None and not trace.finished
    assert trace.steps[0].error_type == error_type and trace.steps[0].error


def test_pal_no_program(sandbox):
    trace = PALAgent(ScriptedPolicy(["I don't know."]), PALConfig(shots=0, prefill=False), sandbox=sandbox).run("q?")
    assert trace.steps[0].error_type == "no-program" and trace.answer is None


def test_pal_self_consistency_votes(sandbox):
    policy = ScriptedPolicy(["\n    return 5", "\n    return 5.0", "\n    return 6"])
    trace = PALAgent(policy, PALConfig(shots=0, self_consistency=3), sandbox=sandbox).run("q?")
    assert trace.answer == "5" and trace.meta["votes"] == {"5": 2, "6": 1}
    assert len(policy.calls) == 1 and policy.calls[0].cfg.n == 3 and not policy.calls[0].cfg.greedy


# ------------------------------------------------------------------------------------------- CoT
@pytest.mark.parametrize(
    "text, answer, repairs",
    [("3 + 2 = 5. The answer is 5.", "5", []), ("The answer is $1,200.", "1200", []),
     ("The answer is -3.5.", "-3.5", []), ("we get 12 apples and 3 pears", "3", ["last-number"]),
     ("no numbers", None, [])],
)
def test_parse_answer(text, answer, repairs):
    assert parse_answer(text) == (answer, repairs)


def test_parse_answer_labels():
    assert parse_answer("It is in Hawkins.\nAnswer:REFUTES", FEVER_FORMAT) == ("REFUTES", [])


def test_cot_prompts():
    ex = [Exemplar("1+1?", "1 + 1 = 2. The answer is 2.")]
    assert build_cot_prompt("2+2?", ex, CoTConfig().format, "raw") == "Q: 1+1?\nA: 1 + 1 = 2. The answer is 2.\n\nQ: 2+2?\nA:"
    assert build_cot_prompt("2+2?", [], CoTConfig().format, "raw") == "Q: 2+2?\nA: Let's think step by step."
    chat = build_cot_prompt("2+2?", ex, CoTConfig().format, "chat")
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]


def test_golden_cot_8shot():
    policy = ScriptedPolicy([" She has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.\n\nQ: more"])
    trace = CoTAgent(policy).run("How much does Janet make?")
    assert trace.answer == "18" and trace.finished and trace.meta["shots"] == 8
    assert policy.prompts[0].count("\nA: ") == 8 and policy.prompts[0].endswith("Q: How much does Janet make?\nA:")
    check_golden("cot_8shot", trace)


def test_cot_self_consistency_one_batched_call():
    policy = ScriptedPolicy(["a. The answer is 4.", "b. The answer is 5.", "c. The answer is 4.", "d. so 5", "e"])
    trace = CoTAgent(policy, CoTConfig(shots=1, self_consistency=5)).run("q?")
    assert len(policy.calls) == 1 and policy.calls[0].cfg.n == 5 and policy.calls[0].cfg.temperature == 0.7
    assert trace.answer == "4" and trace.meta["votes"] == {"4": 2, "5": 2}  # tie: first seen wins
    assert [s.repairs for s in trace.steps][3] == ["last-number"] and trace.steps[4].error_type == "no-answer"


def test_cot_similarity_selection_with_injected_embedder():
    pool = [Exemplar("apples and pears", "x. The answer is 1.", id="fruit"),
            Exemplar("trains and speed", "y. The answer is 2.", id="train"),
            Exemplar("apples in a basket", "z. The answer is 3.", id="basket")]

    def embed(texts):  # bag of two words: "apples", "train"
        return [[t.count("apples") + 0.01, t.count("train") + 0.01] for t in texts]

    policy = ScriptedPolicy(["The answer is 9."])
    trace = CoTAgent(policy, CoTConfig(shots=2, exemplars=pool, embedder=embed)).run("how many apples?")
    assert trace.meta["exemplar_ids"] == ["fruit", "basket"]


def test_cot_context_window_error_when_nothing_fits():
    from ragloop.core.errors import ContextWindowError

    with pytest.raises(ContextWindowError, match="even with no exemplars"):
        CoTAgent(ScriptedPolicy(["x"], context_window=300)).run("word " * 200)


def test_votes_and_canonical_answers():
    assert canonical_answer("$1,200.00") == "1200" and canonical_answer(" Yes. ") == "yes"
    assert majority_vote(["3", "4", "3.0", None]) == ("3", {"3": 2, "4": 1})
    assert majority_vote([None]) == (None, {})


def test_config_validation():
    with pytest.raises(UsageError):
        CoTConfig(shots=-1)
    with pytest.raises(UsageError):
        PALConfig(self_consistency=0)
