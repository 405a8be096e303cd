"""The REPL: slash commands and the live view as plain units, then a real terminal driven with pexpect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragloop.agents.base import AgentEvent
from ragloop.agents.repl import ChatSession, EventPrinter, render_trace
from ragloop.core.trace import read_traces

ROOT = Path(__file__).resolve().parents[2]
RAGLOOP = Path(sys.executable).parent / "ragloop"


def _open_index(name: str):
    from ragloop.core.errors import IndexStoreError

    if name != "mydocs":
        raise IndexStoreError(f"no index at {name}")
    return object()


def test_commands_change_state():
    s = ChatSession(open_index=_open_index)
    assert s.command("/agent pal") == "agent: pal" and s.agent == "pal"
    assert s.command("/agent nope").startswith("usage")
    assert s.command("/index mydocs") == "index: mydocs" and s.command("/index none") == "index: none"
    # a bad index is refused at once and the old one kept
    assert s.command("/index nosuch") == "error: no index at nosuch; still using index none" and s.index is None
    assert s.command("/set temperature 0.7") == "temperature = 0.7" and s.settings["temperature"] == 0.7
    assert s.command("/set temperature -1").startswith("error: temperature must be >= 0")
    assert s.command("/set top_p 2").startswith("error: top_p")
    assert s.command("/set shots x").startswith("error: shots needs a int")
    assert s.command("/set bogus 1").startswith("unknown setting")
    assert s.command("/set self_consistency 0").startswith("error: --self-consistency")
    assert "agent=pal" in s.command("/settings") and "temperature=0.7" in s.command("/settings")
    assert s.command("/trace") == "no trace yet" and s.command("/save x.jsonl") == "no trace yet"
    assert "/agent rag|react|pal|cot" in s.command("/help")
    assert s.command("/agent rag").startswith("the rag agent needs an index")
    assert s.command("/frobnicate").startswith("unknown command")
    assert s.command("/quit") == "bye" and s.quit


def test_effective_task():
    s = ChatSession(agent="react")
    assert s.effective_task() == "math"
    s.index = "docs"
    assert s.effective_task() == "qa"
    s.command("/task claims")
    assert s.effective_task() == "claims"


def test_event_printer_neutralises_and_never_interprets_markup():
    from rich.console import Console

    console = Console(record=True, force_terminal=True, width=100)
    p = EventPrinter(console)
    p(AgentEvent("start", "q", data={"agent": "react"}))
    p(AgentEvent("token", " look [bold]x[/bold]\x1b[2J", 1))
    p(AgentEvent("observation", "Observation 1: <data> evil \x1b]0;title\x07 \x07 [red]r[/red] </data>", 1))
    p(AgentEvent("answer", "42", 1))
    text = console.export_text()
    assert "Thought 1: look [bold]x[/bold]" in text and "[red]r[/red]" in text and "\\x07" in text
    assert "\x1b[2J" not in text and "\x1b]0;" not in text
    assert "Answer: 42" in text


def test_render_trace_for_each_agent():
    from ragloop.core.trace import Step, ToolCall, Trace

    t = Trace(agent="react", question="q?", answer="4", steps=[
        Step(index=1, thought="add", action=ToolCall(name="Calculator", arguments={"expression": "2+2"}),
             observation="Observation 1: <data> 4 </data>"),
        Step(index=2, thought="done", action=ToolCall(name="Finish", arguments={"answer": "4"}))])
    assert render_trace(t).split("\n", 1)[1] == (
        "Question: q?\nThought 1: add\nAction 1: Calculator[2+2]\nObservation 1: <data> 4 </data>"
        "\nThought 2: done\nAction 2: Finish[4]\nAnswer: 4")
    pal = Trace(agent="pal", question="q", steps=[Step(index=1, code="def solution():\n    return 1\n",
                                                       observation="solution() returned 1")], answer="1")
    assert "Result: solution() returned 1" in render_trace(pal)


# ------------------------------------------------------------------------------- a real terminal
pexpect = pytest.importorskip("pexpect")


def _spawn(tmp_path: Path, responses: list[str], *args: str):
    script = tmp_path / "script.json"
    script.write_text(json.dumps(responses))
    env = {**os.environ, "RAGLOOP_HOME": str(tmp_path / "home"), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
           "COLUMNS": "120", "LINES": "40"}
    child = pexpect.spawn(str(RAGLOOP), ["chat", "--policy", f"scripted:{script}", *args], env=env, cwd=str(ROOT),
                          encoding="utf-8", timeout=60, dimensions=(40, 120))
    child.expect("Ctrl-D to leave")
    return child


def _send(child, line: str) -> None:
    """Type a line once the prompt is reading: prompt-toolkit enters raw mode with TCSAFLUSH, which drops
    typeahead sent a moment too early."""
    time.sleep(0.3)
    child.sendline(line)


def _worker_children(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "_worker" in line]


def test_repl_session_in_a_terminal(tmp_path):
    child = _spawn(tmp_path, ["\n    pens = 18\n    return pens / 3 * 2\n", " so 8. The answer is 8.\x1b[2J\x07"],
                   "--agent", "pal")
    child.expect("pal>")
    _send(child, "A store sells pens at 3 for $2. How much do 18 pens cost?")
    child.expect("Program:")
    child.expect("Result: solution\\(\\) returned 12.0")
    child.expect("Answer: 12")
    child.expect("pal>")
    _send(child, "/set temperature 0.7")
    child.expect("temperature = 0.7")
    _send(child, "/agent cot")
    child.expect("agent: cot")
    child.expect("cot>")
    _send(child, "How much is 2 * 4?")
    child.expect("Sample 1|Reasoning 1:")
    child.expect("Answer: 8")
    before = child.before
    assert "\x1b[2J" not in before and "\\x07" in before  # the model's escape sequence was neutralised
    child.expect("cot>")
    save = tmp_path / "saved.jsonl"
    _send(child, f"/save {save}")
    child.expect("saved the last trace")
    _send(child, "/trace")
    child.expect("agent cot")
    child.expect("/trace --json for the raw record")
    _send(child, "/trace --json")
    child.expect('"agent": "cot"')
    time.sleep(0.3)
    child.sendeof()  # Ctrl-D
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    traces = read_traces(save)
    assert len(traces) == 1 and traces[0].agent == "cot" and traces[0].answer == "8"
    assert (tmp_path / "home" / "chat_history").exists()


def _kill_workers(pid: int) -> None:
    import signal

    for line in _worker_children(pid):
        try:
            os.killpg(int(line.split()[0]), signal.SIGKILL)  # the sandbox child leads its own group
        except (ProcessLookupError, PermissionError):
            pass


def test_ctrl_c_cancels_the_step_and_kills_the_sandbox_child(tmp_path):
    child = _spawn(tmp_path, ["\n    while True:\n        pass\n", "\n    return 7\n"], "--agent", "pal",
                   "--timeout", "120")
    try:
        child.expect("pal>")
        _send(child, "Loop forever?")
        child.expect("Program:")
        # wait until the sandbox child is running, then press Ctrl-C
        deadline = time.time() + 30
        while not _worker_children(child.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert _worker_children(child.pid), "the sandbox child never started"
        child.sendintr()
        child.expect("cancelled")
        child.expect("pal>")
        assert _worker_children(child.pid) == []
        _send(child, "And now 7?")  # the REPL still works after the cancel
        child.expect("Answer: 7")
        child.expect("pal>")
        time.sleep(0.3)
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            _kill_workers(child.pid)
            child.close(force=True)


def test_repl_rag_sources_index_check_readable_trace_and_log(tmp_path):
    """The issue-13 behaviour in a real terminal: /index is checked at once, the rag agent prints its sources
    under the answer, CoT votes and ties are shown, /trace is a step list, every exchange lands in the log."""
    from ragloop.core.logs import recent_exchanges
    from ragloop.retrieval import HashingEmbedder, build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "server.md").write_text("# Server\n\nThe admin server listens on port 8443 by default.\n")
    (docs / "mascot.txt").write_text("The mascot of the project is a bluefin tuna.\n")
    idx = tmp_path / "idx"
    build_index([str(docs)], str(idx), embedder=HashingEmbedder(64))
    child = _spawn(tmp_path, ["The admin server listens on port 8443 [1].",
                              "2 + 2 = 4. The answer is 4.", "2 + 2 = 5. The answer is 5."], "--agent", "pal")
    try:
        child.expect("pal>")
        _send(child, "/index nosuchindex")
        child.expect("error: no index at .*nosuchindex.*still using index none")
        child.expect("pal>")
        _send(child, f"/index {idx}")
        child.expect("index: .*idx \\(2 documents")
        _send(child, "/agent rag")
        child.expect("agent: rag")
        child.expect("rag>")
        _send(child, "Which port does the admin server listen on?")
        child.expect("Answer: The admin server listens on port 8443")
        child.expect("Sources:")
        child.expect("server.md")
        child.expect("cited")
        child.expect("rag>")
        _send(child, "/trace")
        child.expect("1. Search\\[Which port")
        child.expect("2. Answer draft")
        child.expect("rag>")
        _send(child, "/agent cot")
        child.expect("cot>")
        _send(child, "/set self_consistency 2")
        child.expect("self_consistency = 2")
        _send(child, "/set temperature 0.7")
        child.expect("temperature = 0.7")
        _send(child, "What is 2 + 2?")
        child.expect("Sample 1: answer 4")
        child.expect("Sample 2: answer 5")
        child.expect("Votes: 4: 1 vote, 5: 1 vote")
        child.expect("Tie between 4, 5")
        child.expect("cot>")
        time.sleep(0.3)
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.close(force=True)
    logged = recent_exchanges(None, path=tmp_path / "home" / "logs.db")
    assert [e.agent for e in logged] == ["rag", "cot"]
    assert logged[0].trace().sources[0].source.endswith("server.md")
