"""The interactive agent REPL (``ragloop chat``) and the live view of a run shared with ``ragloop ask``.

- ``EventPrinter``: draws ``AgentEvent``s as they happen — streamed tokens under ``Thought i:``, actions,
  observations, PAL code and results, self-consistency samples, the answer — with rich. Every piece of
  text is passed through ``neutralize_control`` and printed as plain ``Text`` (never as rich markup),
  so a retrieved document can neither move the cursor nor restyle the terminal (SECURITY.md §4).
- ``answer_notes``: what is printed under an answer — a fallback said plainly, self-consistency vote counts
  and ties, and the sources (file, page/section, chunk) of every agent that retrieved.
- ``render_trace``: a trace as a readable step list (``/trace``; ``/trace --json`` gives the raw record).
- ``ChatSession``: the REPL's state (agent, index, decoding settings, traces) and its slash commands,
  as plain methods that return the text to show (tested without a terminal).
- ``run_repl``: the loop — prompt-toolkit for input and history, Ctrl-C cancels the current step (the
  sandbox kills its child's process group) and returns to the prompt, Ctrl-D exits cleanly.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragloop.agents.base import AgentEvent
from ragloop.agents.safety import neutralize_control
from ragloop.core.errors import RagloopError
from ragloop.core.trace import Trace, write_traces

log = logging.getLogger(__name__)

HELP = """Commands:
  /agent rag|react|pal|cot    switch agent (rag: retrieve, answer with citations)
  /index PATH|NAME|none       search this index (rag, react); checked at once
  /task auto|qa|math|claims   what kind of question (auto: qa with an index, math without)
  /set KEY VALUE              temperature, top_p, top_k, max_new_tokens, max_steps, shots,
                              self_consistency, seed, prompt_style, action_format, constrained (on/off)
  /settings                   show the current settings
  /trace [--json]             the last trace as a step list (--json: the raw record)
  /reasoning                  the last run's full reasoning (CoT samples are shown collapsed)
  /save FILE                  append the last trace to FILE (JSONL)
  /help                       this text
  /quit                       leave (or Ctrl-D)
Ctrl-C cancels the running step and returns to the prompt."""


def _on_off(value: str) -> bool:
    """``_on_off("on") -> True``; a ValueError for anything but on/off/true/false/1/0/yes/no."""
    v = value.strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise ValueError(value)


_SETTABLE: dict[str, Callable[[str], Any]] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_new_tokens": int,
    "max_steps": int,
    "shots": int,
    "self_consistency": int,
    "seed": int,
    "prompt_style": str,
    "action_format": str,
    "constrained": _on_off,  # grammar-constrained decoding (ragloop.models.grammar)
}


def safe_text(text: str) -> str:
    """Terminal-safe text (escape sequences removed, control characters made visible)."""
    return neutralize_control(text)


class EventPrinter:
    """Prints agent events live on a rich Console (plain Text objects only: no markup from data)."""

    def __init__(self, console: Any, *, show_tokens: bool = True, reasoning_lines: int = 0) -> None:
        self.console = console
        self.show_tokens = show_tokens
        self.reasoning_lines = reasoning_lines  # > 0: show each CoT sample's reasoning cut to this many lines
        self._step_open: int | None = None
        self._label = "Thought"
        self._prefill = ""

    def _line(self, text: str, style: str = "") -> None:
        from rich.text import Text

        self.console.print(Text(safe_text(text), style=style), soft_wrap=True)

    def _close_step(self) -> None:
        if self._step_open is not None:
            self.console.print()
            self._step_open = None

    def __call__(self, ev: AgentEvent) -> None:
        from rich.text import Text

        if ev.kind == "token":
            if not self.show_tokens:
                return
            if self._step_open != ev.step:
                self._close_step()
                self._step_open = ev.step
                if self._label == "Program":
                    self.console.print(Text("Program:", style="bold cyan"))
                    self.console.print(Text(safe_text(self._prefill), style="dim"), end="")
                else:
                    self.console.print(Text(f"{self._label} {ev.step}:", style="bold cyan"), end="")
            self.console.print(Text(safe_text(ev.text), style="cyan"), end="")
            return
        self._close_step()
        if ev.kind == "start":
            data = ev.data or {}
            self._label = {"pal": "Program", "cot": "Reasoning", "rag": "Answer draft"}.get(
                str(data.get("agent")), "Thought")
            self._prefill = str(data.get("prefill") or "")
            return
        if ev.kind == "thought" and not self.show_tokens:
            self._line(f"Thought {ev.step}: {ev.text}", "cyan")
        elif ev.kind == "action" and not self.show_tokens:
            self._line(ev.text, "bold magenta")
        elif ev.kind == "observation":
            self._line(ev.text, "green")
        elif ev.kind == "code" and not self.show_tokens:
            self._line(ev.text, "cyan")
        elif ev.kind == "result":
            self._line(f"Result: {ev.text}", "green" if (ev.data or {}).get("ok") else "red")
        elif ev.kind == "sample":
            ans = (ev.data or {}).get("answer")
            self._line(f"Sample {ev.step}: answer {ans!s}", "bold")
            lines = [ln for ln in ev.text.strip().splitlines() if ln.strip()]
            cut = self.reasoning_lines
            shown = lines if cut <= 0 or len(lines) <= cut else lines[:cut]
            for ln in shown:
                self._line(f"  {ln}", "dim")
            if len(shown) < len(lines):
                self._line(f"  … {len(lines) - len(shown)} more lines (/reasoning shows them)", "dim italic")
        elif ev.kind == "error":
            self._line(f"Error: {ev.text}", "red")
        elif ev.kind == "fallback":
            self._line(ev.text, "yellow")
        elif ev.kind == "answer":
            self._line(f"Answer: {ev.text or '(none)'}", "bold green")


def vote_summary(votes: dict[str, int]) -> tuple[str, list[str]]:
    """``("4: 2 votes, 5: 1 vote", [])`` — the counts, best first, and the answers tied for first (if more
    than one). ``vote_summary({"4": 1, "5": 1}) -> ("4: 1 vote, 5: 1 vote", ["4", "5"])``."""
    if not votes:
        return "", []
    ranked = sorted(votes.items(), key=lambda kv: -kv[1])  # stable: ties keep first-seen order
    text = ", ".join(f"{a}: {c} vote{'s' if c != 1 else ''}" for a, c in ranked)
    top = ranked[0][1]
    tied = [a for a, c in ranked if c == top]
    return text, tied if len(tied) > 1 else []


def answer_notes(trace: Trace) -> list[str]:
    """Lines to print under an answer: the fallback stated, self-consistency votes and ties, the sources."""
    from ragloop.agents.rag import render_sources

    out: list[str] = []
    if trace.meta.get("stop_reason") == "repeated-action":
        rep = (trace.meta.get("repeated_actions") or [{}])[-1]
        out.append(f"Note: the agent repeated the same action ({rep.get('action', '?')}) {rep.get('count', '?')} "
                   "times without progress and was stopped.")
    if trace.fallback == "cot-sc":
        out.append("Note: the agent did not finish on its own; this answer comes from its fallback "
                   "(chain-of-thought self-consistency, without the documents).")
    elif trace.fallback == "extractive":
        out.append("Note: the model wrote no answer; this is the best-matching sentence of passage [1].")
    elif trace.fallback:
        out.append(f"Note: fallback {trace.fallback} answered.")
    votes = trace.meta.get("votes") or (trace.meta.get("fallback_trace") or {}).get("meta", {}).get("votes") or {}
    if votes and sum(votes.values()) > 1:
        text, tied = vote_summary(votes)
        out.append(f"Votes: {text}")
        if tied:
            out.append(f"Tie between {', '.join(tied)}: the first sampled ({tied[0]}) was taken; "
                       "more samples (--self-consistency) would break it.")
    src = render_sources(trace)
    if src:
        out.extend(src.splitlines())
    return out


def render_trace(trace: Trace) -> str:
    """A readable multi-line account of a trace: a numbered step list, the answer and its notes."""
    lines = [f"Trace {trace.id[:8]} · agent {trace.agent} · {trace.seconds:.1f}s · "
             f"{trace.tokens_in} tokens in, {trace.tokens_out} out", f"Question: {trace.question}"]
    for s in trace.steps:
        if trace.agent == "rag":
            if s.action is not None:
                lines.append(f"{s.index}. Search[{s.action.arguments.get('query', '')}] -> "
                             f"{len(s.retrieved_ids)} passages")
            else:
                lines.append(f"{s.index}. Answer draft: {(s.thought or '').strip()}")
        elif trace.agent == "react":
            if s.thought:
                lines.append(f"Thought {s.index}: {s.thought}")
            if s.action is not None:
                args = ", ".join(str(v) for v in s.action.arguments.values())
                lines.append(f"Action {s.index}: {s.action.name}[{args}]")
            if s.observation:
                lines.append(s.observation)
            elif s.error:
                lines.append(f"Error {s.index}: {s.error}")
        elif trace.agent == "pal":
            lines.append(s.code or f"(no program) {s.raw_output or ''}")
            lines.append(f"Result: {s.observation or s.error}")
        else:
            lines.append(f"Reasoning {s.index}: {(s.thought or '').strip()}")
    if trace.fallback:
        lines.append(f"(fell back to {trace.fallback})")
    lines.append(f"Answer: {trace.answer if trace.answer is not None else '(none)'}")
    lines.extend(answer_notes(trace))
    return safe_text("\n".join(lines))


def render_reasoning(trace: Trace) -> str:
    """Every reasoning text of a run in full (CoT samples, ReAct thoughts, a fallback's samples)."""
    parts = []
    for s in trace.steps:
        if s.thought:
            parts.append(f"--- step {s.index} ---\n{s.thought.strip()}")
    for s in (trace.meta.get("fallback_trace") or {}).get("steps", []):
        if s.get("thought"):
            parts.append(f"--- fallback sample {s.get('index')} ---\n{str(s['thought']).strip()}")
    return safe_text("\n".join(parts) or "no reasoning recorded")


@dataclass
class ChatSession:
    """State of the REPL; ``command`` runs a slash command and returns the text to print."""

    agent: str = "react"
    index: str | None = None
    task: str = "auto"
    settings: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "seed": 0})
    traces: list[Trace] = field(default_factory=list)
    quit: bool = False
    # opens an index (raising RagloopError if it cannot); None: ``Retriever.open``. Opened ones are kept.
    open_index: Callable[[str], Any] | None = None
    retrievers: dict[str, Any] = field(default_factory=dict)

    def retriever(self, name: str) -> Any:
        """The opened index ``name`` (opened on first use; errors are the store's one-line RagloopErrors)."""
        if name not in self.retrievers:
            if self.open_index is not None:
                self.retrievers[name] = self.open_index(name)
            else:
                from ragloop.retrieval import Retriever

                self.retrievers[name] = Retriever.open(name)
        return self.retrievers[name]

    @property
    def last_trace(self) -> Trace | None:
        return self.traces[-1] if self.traces else None

    def effective_task(self) -> str:
        if self.task != "auto":
            return self.task
        if self.agent in ("react", "rag") and self.index:
            return "qa"
        return "math"

    def describe(self) -> str:
        s = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"agent={self.agent} index={self.index or 'none'} task={self.effective_task()} {s}"

    def command(self, line: str) -> str:
        try:
            parts = shlex.split(line)
        except ValueError as e:
            return f"error: {e}"
        if not parts:
            return ""
        cmd, args = parts[0].lower(), parts[1:]
        if cmd in ("/quit", "/exit"):
            self.quit = True
            return "bye"
        if cmd == "/help":
            return HELP
        if cmd == "/agent":
            if len(args) != 1 or args[0] not in ("rag", "react", "pal", "cot"):
                return "usage: /agent rag|react|pal|cot"
            if args[0] == "rag" and not self.index:
                return "the rag agent needs an index: /index PATH|NAME first"
            self.agent = args[0]
            return f"agent: {self.agent}"
        if cmd == "/index":
            if len(args) != 1:
                return "usage: /index PATH|NAME|none"
            if args[0].lower() == "none":
                if self.agent == "rag":
                    return "the rag agent needs an index; /agent react|pal|cot first"
                self.index = None
                return "index: none"
            try:
                r = self.retriever(args[0])
            except RagloopError as e:
                return f"error: {e.message}" + (f" ({e.hint})" if e.hint else "") + \
                    f"; still using index {self.index or 'none'}"
            self.index = args[0]
            size = f" ({r.num_documents} documents, {len(r)} chunks)" if hasattr(r, "num_documents") else ""
            return f"index: {self.index}{size}"
        if cmd == "/task":
            if len(args) != 1 or args[0] not in ("auto", "qa", "math", "claims"):
                return "usage: /task auto|qa|math|claims"
            self.task = args[0]
            return f"task: {self.task}"
        if cmd == "/set":
            return self._set(args)
        if cmd == "/settings":
            return self.describe()
        if cmd == "/trace":
            t = self.last_trace
            if t is None:
                return "no trace yet"
            if args and args[0] == "--json":
                return safe_text(json.dumps(json.loads(t.to_json()), indent=1))
            return render_trace(t) + "\n(/trace --json for the raw record)"
        if cmd == "/reasoning":
            t = self.last_trace
            return "no trace yet" if t is None else render_reasoning(t)
        if cmd == "/save":
            if len(args) != 1:
                return "usage: /save FILE"
            if self.last_trace is None:
                return "no trace yet"
            try:
                write_traces(Path(args[0]).expanduser(), [self.last_trace], append=True)
            except OSError as e:
                return f"error: cannot write {args[0]}: {e.strerror or e}"
            return f"saved the last trace to {args[0]}"
        return f"unknown command {cmd}; /help lists them"

    def _set(self, args: list[str]) -> str:
        if len(args) != 2:
            return "usage: /set KEY VALUE  (keys: " + ", ".join(_SETTABLE) + ")"
        key, raw = args[0].lower().replace("-", "_"), args[1]
        if key not in _SETTABLE:
            return f"unknown setting {key!r}; choose one of: {', '.join(_SETTABLE)}"
        try:
            value = _SETTABLE[key](raw)
        except ValueError:
            return f"error: {key} needs a {_SETTABLE[key].__name__}, got {raw!r}"
        try:
            self.spec_with(**{key: value})  # validate before accepting
        except RagloopError as e:
            return f"error: {e.message}"
        self.settings[key] = value
        return f"{key} = {value}"

    def spec_with(self, **override: Any) -> Any:
        """The AgentSpec for the current state (``override`` checks a setting before it is kept)."""
        from ragloop.agents.factory import AgentSpec
        from ragloop.models.types import GenerationConfig

        s = {**self.settings, **override}
        if s.get("temperature"):
            GenerationConfig(temperature=float(s["temperature"]), top_p=float(s.get("top_p", 1.0)),
                             top_k=int(s.get("top_k", 0)))
        return AgentSpec(
            kind=self.agent, task=self.effective_task(),  # type: ignore[arg-type]
            shots=s.get("shots"), self_consistency=int(s.get("self_consistency", 1)),
            prompt_style=s.get("prompt_style"), action_format=s.get("action_format", "text"),
            max_new_tokens=s.get("max_new_tokens"), max_steps=s.get("max_steps"),
            temperature=s.get("temperature") or None, top_p=float(s.get("top_p", 1.0)),
            top_k=int(s.get("top_k", 0)), seed=int(s.get("seed", 0)), constrained=bool(s.get("constrained", False)),
        )


def run_repl(
    session: ChatSession,
    load_policy: Callable[[], Any],
    *,
    console: Any = None,
    history_file: Path | None = None,
    sandbox_seconds: float = 5.0,
    log: bool = True,
) -> int:
    """The read-eval-print loop. Returns the exit code (0 after Ctrl-D or /quit)."""
    import signal

    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from rich.console import Console

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Ctrl-C is the REPL's "cancel this step" key; a shell that started us in the background without job
        # control (a script, make under nohup) hands SIGINT down ignored, so take it back
        signal.signal(signal.SIGINT, signal.default_int_handler)

    from ragloop.agents.factory import build_agent
    from ragloop.agents.rag import attach_sources
    from ragloop.agents.sandbox import Sandbox, SandboxLimits

    console = console or Console(highlight=False)
    history: Any = InMemoryHistory()
    if history_file is not None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        except OSError as e:
            log.warning("no input history: %s", e)
    prompt = PromptSession(history=history)
    sandbox = Sandbox(SandboxLimits(wall_seconds=sandbox_seconds, cpu_seconds=max(1, int(sandbox_seconds))))
    policy: Any = None
    console.print("ragloop chat — /help for commands, Ctrl-D to leave", highlight=False)
    console.print(session.describe(), style="dim", highlight=False)
    while not session.quit:
        try:
            line = prompt.prompt(f"{session.agent}> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            console.print("bye")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            out = session.command(line)
            if out:
                from rich.text import Text

                console.print(Text(out))
            continue
        try:
            if policy is None:
                console.print("loading the model…", style="dim")
                policy = load_policy()
            retriever = None
            if session.agent in ("react", "rag") and session.index:
                retriever = session.retriever(session.index)
            spec = session.spec_with()
            agent = build_agent(policy, spec, retriever=retriever, sandbox=sandbox,
                                on_event=EventPrinter(console, reasoning_lines=3))
            trace = agent.run(line)
            attach_sources(trace, retriever)
            session.traces.append(trace)
            from rich.text import Text

            for note in answer_notes(trace):
                console.print(Text(safe_text(note), style="dim"))
            if log:
                from ragloop.core.logs import append_exchange

                append_exchange(trace, command="chat", index=session.index)
        except KeyboardInterrupt:
            killed = sandbox.cancel()
            console.print(f"\ncancelled{' (stopped the sandbox)' if killed else ''}", style="yellow")
        except RagloopError as e:
            console.print(f"error: {e.message}" + (f" ({e.hint})" if e.hint else ""), style="red", markup=False)
    return 0
