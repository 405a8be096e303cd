"""ReAct loop logic with a scripted policy: golden traces, budgets, fallback, JSON actions, events."""

from __future__ import annotations

import pytest
from agent_helpers import CORPUS, check_golden

from ragloop.agents.cot import CoTAgent, CoTConfig
from ragloop.agents.docsearch import KeywordBackend
from ragloop.agents.prompts import load_react_exemplars
from ragloop.agents.react import ReActAgent, ReActConfig, trajectory_to_json
from ragloop.agents.tools import ToolRegistry, calculator_tool, finish_tool
from ragloop.core.errors import UsageError
from ragloop.models.scripted import ScriptedPolicy

GOOD = [
    " I need to search nucleus sampling.\nAction 1: Search[nucleus sampling]\nObservation 1: (made up by the model)",
    " It was introduced in 2020. I should look up who.\nAction 2: Lookup[introduced]",
    " Holtzman et al. introduced it, so the answer is Holtzman et al.\nAction 3: Finish[Holtzman et al.]",
]


def make(policy, **cfg):
    return ReActAgent(policy, search_backend=KeywordBackend(CORPUS), config=ReActConfig(**cfg))


def test_golden_react_chat():
    policy = ScriptedPolicy(GOOD)
    trace = make(policy, shots=1).run("Who introduced nucleus sampling?")
    assert trace.finished and trace.answer == "Holtzman et al." and trace.fallback is None
    assert [s.action.name for s in trace.steps] == ["Search", "Lookup", "Finish"]
    assert trace.steps[0].retrieved_ids[0] == "nucleus"
    assert trace.steps[1].observation.startswith("Observation 2: <data> (Result 1 / 1) It was introduced")
    # the model's made-up observation was cut by the stop sequence and never executed
    assert "made up" not in trace.steps[0].raw_output
    assert trace.steps[0].repairs == []
    # the policy saw the observations, wrapped in data delimiters, in the turn after each action
    assert "<data> (Nucleus sampling) Nucleus sampling keeps" in policy.prompts[1]
    assert policy.prompts[2].endswith("Thought 3:")
    assert policy.calls[0].cfg.greedy and "\nObservation" in policy.calls[0].cfg.stop
    roles = [m.role for m in trace.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert not any(m.trainable for m in trace.messages if m.role != "assistant" and m.role != "system"
                   and m.content.startswith("Observation"))
    assert trace.tokens_out > 0 and trace.tokens_in > 0 and trace.seed == 0
    check_golden("react_chat", trace)


def test_golden_react_raw_with_repairs():
    policy = ScriptedPolicy([
        ' I will search.\nAction: search["nucleus sampling"]',
        " Done.\nFinal Answer: Holtzman et al.",
    ])
    trace = make(policy, shots=1, prompt_style="raw").run("Who introduced nucleus sampling?")
    assert trace.finished and trace.answer == "Holtzman et al."
    assert trace.steps[0].repairs == ["action-number-missing", "tool-name-case", "quoted-argument"]
    assert trace.steps[1].repairs == ["final-answer-line"]
    assert policy.prompts[0].endswith("Question: Who introduced nucleus sampling?\nThought 1:")
    assert "\nObservation 1: <data> (Nucleus sampling) Nucleus" in policy.prompts[1]
    assert trace.meta["prompt_style"] == "raw"
    # raw style: the message contents, concatenated, are exactly the text the model saw
    assert "".join(m.content for m in trace.messages[:-1]) + "Thought 2:" == policy.prompts[-1]
    check_golden("react_raw_repairs", trace)


def test_invalid_action_becomes_observation_and_loop_goes_on():
    policy = ScriptedPolicy([" hmm, let me think", " ok\nAction 2: Finish[42]"])
    trace = make(policy, shots=0, prompt_action=False).run("q?")
    assert trace.steps[0].error_type == "no-action"
    assert "Invalid action" in trace.steps[0].observation
    assert trace.finished and trace.answer == "42"


def test_missing_action_is_prompted_like_the_paper():
    # the model thinks but writes no action; the agent keeps the first line and asks for "Action 1:"
    policy = ScriptedPolicy([" I should search for ReAct.\nIt is a method.", " Search[ReAct]\nmore", " f\nAction 2: Finish[Yao]"])
    trace = make(policy, shots=0).run("Who proposed ReAct?")
    assert policy.prompts[1].endswith("Thought 1: I should search for ReAct.\nAction 1:")
    assert policy.calls[1].cfg.stop == ["\n"]
    s1 = trace.steps[0]
    assert s1.action.name == "Search" and s1.repairs == ["action-prompted"]
    assert s1.raw_output == " I should search for ReAct.\nIt is a method."  # the first generation, verbatim
    assert trace.messages[2].content == "Thought 1: I should search for ReAct.\nAction 1: Search[ReAct]"
    assert trace.meta["prompted_actions"] == {"1": " Search[ReAct]"}
    assert trace.answer == "Yao"


def test_unknown_tool_is_an_error_not_a_crash():
    policy = ScriptedPolicy([" x\nAction 1: Delete[everything]", " y\nAction 2: Finish[no]"])
    trace = make(policy, shots=0).run("q?")
    assert trace.steps[0].error_type == "bad-action" and "unknown tool" in trace.steps[0].error
    assert trace.answer == "no"


def test_step_budget_then_cot_sc_fallback():
    # 2 steps of searching, never Finish; then the fallback samples 3 CoT answers in one call
    policy = ScriptedPolicy([" a\nAction 1: Search[top-k]", " b\nAction 2: Search[react]",
                             "x. The answer is 7.", "y. The answer is 7.", "z. The answer is 8."])
    agent = make(policy, shots=0, max_steps=2, fallback_samples=3)
    trace = agent.run("How many?")
    assert not trace.finished and trace.fallback == "cot-sc" and trace.answer == "7"
    assert trace.meta["stop_reason"] == "max-steps"
    sub = trace.meta["fallback_trace"]
    assert sub["agent"] == "cot" and sub["meta"]["votes"] == {"7": 2, "8": 1}
    assert policy.calls[-1].cfg.n == 3 and len(policy.calls) == 3  # n samples in ONE call


def test_token_budget_and_no_fallback():
    policy = ScriptedPolicy([" a b c d e f g h\nAction 1: Search[top-k]"], default=" more words here")
    trace = make(policy, shots=0, max_total_tokens=20, max_new_tokens=16, fallback="none").run("q?")
    assert trace.meta["stop_reason"] == "max-tokens" and trace.answer is None and not trace.finished
    assert sum(s.tokens_out for s in trace.steps) <= 20


def test_tool_call_budget():
    policy = ScriptedPolicy([f" s\nAction {i}: Search[top-k]" for i in range(1, 5)])
    trace = make(policy, shots=0, max_tool_calls=2, fallback="none").run("q?")
    assert trace.meta["stop_reason"] == "max-tool-calls" and trace.meta["tool_calls"] == 2
    assert trace.steps[-1].error_type == "budget"


def test_json_action_format():
    policy = ScriptedPolicy([
        ' look it up\n{"tool": "Search", "arguments": {"query": "ReAct"}}',
        ' found it\n```json\n{"tool": "finish", "arguments": {"answer": "Yao et al."}}\n```',
    ])
    trace = make(policy, shots=1, action_format="json").run("Who proposed ReAct?")
    assert trace.answer == "Yao et al." and trace.finished
    assert trace.steps[1].repairs == ["code-fence", "tool-name-case"]
    assert '{"tool": "Search", "arguments": {"query": "Colorado orogeny"}}' in policy.prompts[0]


def test_trajectory_to_json():
    reg = ToolRegistry([calculator_tool(), finish_tool()])
    out = trajectory_to_json("Thought 1: t\nAction 1: Calculator[2 + 2]\nAction 2: Finish[4]", reg)
    assert out == ('Thought 1: t\nAction 1: {"tool": "Calculator", "arguments": {"expression": "2 + 2"}}\n'
                   'Action 2: {"tool": "Finish", "arguments": {"answer": "4"}}')


def test_calculator_react_and_custom_tool():
    def shout(text: str) -> str:
        """Upper-cases the text."""
        return text.upper()

    policy = ScriptedPolicy([" c\nAction 1: Calculator[21 - 15]", " s\nAction 2: Shout[ok]", " f\nAction 3: Finish[6]"])
    agent = ReActAgent(policy, [calculator_tool(), shout], config=ReActConfig(shots=0))
    trace = agent.run("21 - 15?")
    assert [s.observation for s in trace.steps[:2]] == ["Observation 1: <data> 6 </data>",
                                                         "Observation 2: <data> OK </data>"]
    assert "(2) shout[text], which Upper-cases the text." in trace.messages[0].content
    assert trace.answer == "6"


def test_events_stream_tokens_and_steps():
    events = []
    policy = ScriptedPolicy(GOOD)
    agent = make(policy, shots=0)
    agent.on_event = events.append
    agent.run("Who introduced nucleus sampling?")
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and "token" in kinds and kinds[-1] == "answer"
    assert [e.kind for e in events if e.kind in ("action", "observation")] == ["action", "observation"] * 2 + ["action"]
    streamed = "".join(e.text for e in events if e.kind == "token" and e.step == 1)
    assert streamed == " I need to search nucleus sampling.\nAction 1: Search[nucleus sampling]"


def test_exemplars_dropped_whole_to_fit_window():
    policy = ScriptedPolicy(GOOD, context_window=1800)
    trace = make(policy, shots=6, max_steps=3, max_new_tokens=64, observation_chars=200).run("Who?")
    assert 0 < trace.meta["shots"] < 6
    kept = load_react_exemplars()[: trace.meta["shots"]]
    assert kept[-1].answer in trace.messages[0].content  # whole exemplars only


def test_bad_config_and_empty_question():
    with pytest.raises(UsageError, match="max_steps"):
        ReActConfig(max_steps=0)
    with pytest.raises(UsageError, match="empty"):
        make(ScriptedPolicy([]), shots=0).run("  ")


def test_fallback_agent_can_be_given():
    policy = ScriptedPolicy([" a", "r. The answer is 3."])
    cot = CoTAgent(policy, CoTConfig(shots=0))
    trace = ReActAgent(policy, search_backend=KeywordBackend(CORPUS),
                       config=ReActConfig(shots=0, max_steps=1, prompt_action=False), fallback_agent=cot).run("q?")
    assert trace.fallback == "cot-sc" and trace.answer == "3"
