"""CAI revisions that earn their place (issue 11 §5): a revision is training data only if it still works in
the agent's format, keeps the facts, and does not loop. The issue's two examples are rejected."""

from __future__ import annotations

import pytest

from ragloop.agents.sandbox.host import Sandbox
from ragloop.alignment.cai import (
    check_revision,
    fact_tokens,
    invented_facts,
    is_degenerate,
    load_constitution,
    repetition_ratio,
    revise_traces,
)
from ragloop.cli import main
from ragloop.core.trace import Feedback, Message, Step, Trace
from ragloop.models.scripted import ScriptedPolicy

PAL_PROMPT = 'Q: What is 2+2?\n\n# solution in Python:\n\n\ndef solution():\n    """What is 2+2?"""'
PAL_BODY = "\n    a = 2\n    b = 2\n    result = a + b\n    return result\n"
REPEATED = "I will make the program clearer. " * 6
PORT_Q = "Which port does the gateway listen on?"
PORT_OBS = "Observation 1: <data> The gateway listens on port 8443 (TLS). </data>"
PORT_TRAJ = ("Thought 1: Search the docs.\nAction 1: Search[gateway port]\n" + PORT_OBS
             + "\nThought 2: It is 8443.\nAction 2: Finish[port 8443]")


def pal_trace(correct: bool | None = True) -> Trace:
    return Trace(agent="pal", task="gsm8k", question="What is 2+2?", answer="4", finished=True,
                 messages=[Message(role="user", content=PAL_PROMPT), Message(role="assistant", content=PAL_BODY)],
                 meta={"prompt_style": "raw"}, feedback=Feedback(correct=correct))


def react_trace() -> Trace:
    return Trace(agent="react", question=PORT_Q, answer="port 8443", finished=True,
                 messages=[Message(role="system", content="Solve with Search and Finish."),
                           Message(role="user", content=f"Question: {PORT_Q}"),
                           Message(role="assistant", content="Thought 1: Search the docs.\nAction 1: Search[gateway port]"),
                           Message(role="user", content=PORT_OBS, trainable=False),
                           Message(role="assistant", content="Thought 2: It is 8443.\nAction 2: Finish[port 8443]")],
                 steps=[Step(index=1, observation=PORT_OBS)], meta={"tools": ["Search", "Finish"]})


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox()


def test_facts_and_repetition_on_literals():
    assert fact_tokens("Use port 8443 and HTTP_PROXY, about 1,000 calls") == {"8443", "HTTP_PROXY", "1000"}
    assert fact_tokens("eth0 runs v2.1, step-by-step") == {"eth0", "v2.1"}  # hyphenated words are no facts
    assert invented_facts("the port is 1080", ["use port 8443"]) == {"1080"}
    assert invented_facts("the port is 8443, in 2 steps", ["use port 8443"]) == set()  # small counts are no facts
    assert repetition_ratio("a b c d a b c d", 4) == pytest.approx(0.2)
    assert repetition_ratio("one two three") == 0.0
    assert is_degenerate(REPEATED) and not is_degenerate(PAL_BODY)
    assert is_degenerate("the the the the the the the the the the the the")


def test_issue_example_program_replaced_by_a_repeated_sentence_is_rejected(sandbox):
    assert check_revision(pal_trace(), PAL_BODY, REPEATED, sandbox=sandbox) == "degenerate"
    # one sentence, not repeated: after the prompt's prefill it is no program that runs
    assert check_revision(pal_trace(), PAL_BODY, "I will make the program clearer.", sandbox=sandbox) == "program_fails"


def test_pal_revisions_must_run_and_keep_a_judged_answer(sandbox):
    body = "\n    first = 2\n    second = 2\n    total = first + second\n    return total\n"
    assert check_revision(pal_trace(), PAL_BODY, body, sandbox=sandbox) is None  # renamed variables: fine
    full = 'def solution():\n    """What is 2+2?"""\n    return 2 + 2\n'
    assert check_revision(pal_trace(), PAL_BODY, full, sandbox=sandbox) is None  # a whole program: fine
    assert check_revision(pal_trace(), PAL_BODY, "\n    return 2 / 0\n", sandbox=sandbox) == "program_fails"
    assert check_revision(pal_trace(), PAL_BODY, "\n    return 2 + 3\n", sandbox=sandbox) == "answer_changed"
    # a wrong trace may be corrected to another value; a new constant is still an invented fact
    assert check_revision(pal_trace(False), PAL_BODY, "\n    return 2 * 2\n", sandbox=sandbox) is None
    assert check_revision(pal_trace(False), PAL_BODY, "\n    return 2 + 37\n", sandbox=sandbox) == "invented_fact"


def test_issue_example_changed_port_is_rejected():
    t = react_trace()
    changed = PORT_TRAJ.replace("It is 8443.", "It is 1080.").replace("Finish[port 8443]", "Finish[port 1080]")
    assert check_revision(t, PORT_TRAJ, changed) == "invented_fact"
    dropped = PORT_TRAJ.replace("It is 8443.", "It is the TLS port.").replace("Finish[port 8443]", "Finish[the TLS port]")
    assert check_revision(t, PORT_TRAJ, dropped) == "dropped_fact"
    broken = PORT_TRAJ.replace("Action 2: Finish[port 8443]", "So the answer is port 8443.")
    assert check_revision(t, PORT_TRAJ, broken) == "action_unparsable"
    better = PORT_TRAJ.replace("It is 8443.", "The docs say the gateway listens on 8443 with TLS.")
    assert check_revision(t, PORT_TRAJ, better) is None


def test_revise_traces_counts_rejections_and_keeps_good_rows(sandbox, tmp_path):
    good = "\n    first = 2\n    second = 2\n    return first + second\n"
    pol = ScriptedPolicy(["crit", REPEATED, "crit", good], name="scripted")
    res = revise_traces(pol, [pal_trace(), pal_trace()], load_constitution(["answers-question"]),
                        out_path=tmp_path / "rows.jsonl", sandbox=sandbox)
    assert (res.read, res.revised, res.unchanged, dict(res.rejected)) == (2, 1, 0, {"degenerate": 1})
    assert res.rows[0].messages[-1].content == good  # re-indented as the raw prompt's continuation
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 1


def test_cli_prints_rejections_by_reason(tmp_path, capsys, monkeypatch):
    import ragloop.models.loading

    traces = tmp_path / "t.jsonl"
    traces.write_text(react_trace().model_dump_json() + "\n")
    changed = PORT_TRAJ.replace("8443", "1080")
    # the reviser: a scripted policy (the CLI's --policy takes local models; the logic is what is tested here)
    monkeypatch.setattr(ragloop.models.loading, "load_policy", lambda spec=None, **kw: ScriptedPolicy(["crit", changed]))
    assert main(["cai", "revise", "--traces", str(traces), "--out", str(tmp_path / "o.jsonl"), "--quiet",
                 "--principles", "evidence"]) == 0
    out = capsys.readouterr().out
    assert "kept 0 revisions of 1 traces" in out and "1 revisions rejected (invented_fact: 1)" in out
    assert (tmp_path / "o.jsonl").read_text() == ""
