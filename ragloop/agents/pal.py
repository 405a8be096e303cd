"""PAL: program-aided language models (Gao et al. 2023, "PAL: Program-aided Language Models").

The model writes ``def solution():`` for the question (the paper's 8-exemplar GSM8K prompt, or its chat
variant); ``extract_program`` pulls the program out of whatever the model wrote (code fences, chatter
before/after, a missing ``return result``); the program runs in the process-isolated sandbox
(``ragloop.agents.sandbox``, SECURITY.md §1); the answer is ``solution()``'s return value. Sandbox
rejections and errors are results recorded in the Trace, never exceptions.

Prompt styles: ``raw`` (the paper's plain completion prompt; with ``prefill`` the prompt already ends with
``def solution():`` and the question as its docstring, as in every exemplar) and ``chat`` (the paper's
chat prompt: system message + exemplars in the user turn).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from ragloop.agents.base import (
    AgentBase,
    EventHandler,
    greedy_config,
    majority_vote,
    messages_of,
    with_changes,
)
from ragloop.agents.calculator import format_number
from ragloop.agents.prompts import Exemplar, data_path, fit_exemplars, load_pal_exemplars, select_exemplars
from ragloop.agents.runtime import EpisodeGen, ModelCall
from ragloop.agents.safety import injection_flags, wrap_observation
from ragloop.core.errors import UsageError
from ragloop.core.trace import Message, Step
from ragloop.models.grammar import pal_grammar
from ragloop.models.types import GenerationConfig, Policy, Prompt

CHAT_SYSTEM_FALLBACK = "You will write python program to solve math problems. You will only write code blocks."
CHAT_HEAD_FALLBACK = "Let's use python to solve math problems. Here are three examples how to do it,"


@dataclass
class PALConfig:
    shots: int = 8
    exemplars: list[Exemplar] | None = None  # default: the paper's 8 GSM8K programs
    embedder: Any = None
    prompt_style: Literal["raw", "chat"] = "raw"
    prefill: bool = True  # the prompt ends with ``def solution():`` + docstring (raw style)
    max_new_tokens: int = 256
    self_consistency: int = 1  # >1: sample programs, vote on their results
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = 0
    decoding: GenerationConfig | None = None
    constrained: bool = False  # grammar-constrained program (ragloop.models.grammar.pal_grammar)

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise UsageError(f"shots must be >= 0, got {self.shots}")
        if self.self_consistency < 1:
            raise UsageError(f"self_consistency must be >= 1, got {self.self_consistency}")
        if self.prompt_style not in ("raw", "chat"):
            raise UsageError(f"prompt_style must be 'raw' or 'chat', got {self.prompt_style!r}")


# ------------------------------------------------------------------------------------ extraction
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_DEF_RE = re.compile(r"^def\s+(\w+)\s*\(", re.M)


def extract_program(text: str) -> tuple[str | None, list[str]]:
    """The ``def solution():`` program in the model's text, and the repairs made to get it.

    Takes the fenced block holding ``def solution`` if there is one; then from the first top-level
    ``def`` the indented body (blank lines inside allowed) up to the first top-level statement that is
    not another ``def``. Adds ``return result`` when the function assigns ``result`` but never returns.

    >>> extract_program("Sure!\\n```python\\ndef solution():\\n    x = 2\\n    return x\\n```\\nDone.")
    ('def solution():\\n    x = 2\\n    return x\\n', ['code-fence', 'text-outside-program'])
    """
    repairs: list[str] = []
    src = text.replace("\r\n", "\n").replace("\t", "    ")
    blocks = list(_FENCE_RE.finditer(src))
    if blocks:
        with_def = [b for b in blocks if "def solution" in b.group(1)]
        chosen = with_def[0] if with_def else blocks[0]
        repairs.append("code-fence")
        outside = src[: chosen.start()] + src[chosen.end():]
        src = chosen.group(1)
        if outside.strip():
            repairs.append("text-outside-program")
    m = _DEF_RE.search(src)
    if m is None:
        return None, repairs
    if src[: m.start()].strip() and "text-outside-program" not in repairs:
        repairs.append("text-outside-program")
    lines = src[m.start():].split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if not line.strip() or line[0] in " #":
            kept.append(line)
            continue
        if line.startswith(("def ", "import math", "from math ")):
            kept.append(line)
            continue
        if "text-outside-program" not in repairs:
            repairs.append("text-outside-program")
        break
    program = "\n".join(kept).rstrip() + "\n"
    if not re.search(r"^def\s+solution\s*\(", program, re.M):
        names = _DEF_RE.findall(program)
        if len(names) == 1:
            program = re.sub(rf"^def\s+{names[0]}\s*\(", "def solution(", program, count=1, flags=re.M)
            repairs.append("renamed-function")
        else:
            return None, repairs
    body = program.split("def solution", 1)[1]
    if not re.search(r"^\s+return\b", body, re.M) and re.search(r"^\s+result\s*=", body, re.M):
        program = program.rstrip("\n") + "\n    return result\n"
        repairs.append("added-return")
    return program, repairs


def format_value(value: Any) -> str | None:
    """An answer string from a program's return value: ``format_value(18.0) -> '18'``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return format_value(value[0])
    return str(value)


def join_prefill(prefill: str, text: str) -> tuple[str, list[str]]:
    """The program text = the prefilled ``def solution():`` + docstring, then the model's continuation.

    The prompt ends right after the docstring's closing quotes, so a well-formed continuation starts with a
    newline. A continuation that starts directly with the indented body (``    x = 1``) is a near miss: the
    newline is inserted and the repair recorded (``newline-after-docstring``).
    """
    if prefill.endswith('"""') and text[:1] in (" ", "\t") and text.lstrip(" \t")[:1] not in ("\n", ""):
        return prefill + "\n" + text, ["newline-after-docstring"]
    return prefill + text, []


def _docstring_line(question: str) -> str:
    q = " ".join(question.split()).replace("\\", "\\\\").replace('"""', "'''")
    # no trailing newline: the model's next token is "\n    " (one token in most BPE vocabularies), as in
    # every exemplar; ending the prompt inside that token makes small models start a new function
    return f'def solution():\n    """{q}"""'


class PALAgent(AgentBase):
    """``PALAgent(policy).run(question) -> Trace``; programs run in ``sandbox`` (default: a new Sandbox)."""

    concurrent_safe = True  # no per-run state on the agent: one instance may run many episodes at once

    kind = "pal"

    def __init__(self, policy: Policy, config: PALConfig | None = None, *, sandbox: Any = None,
                 on_event: EventHandler | None = None) -> None:
        super().__init__(policy, on_event=on_event)
        self.config = config or PALConfig()
        if sandbox is None:
            from ragloop.agents.sandbox import Sandbox

            sandbox = Sandbox()
        self.sandbox = sandbox

    # ---------------------------------------------------------------------------------- prompt
    def build_prompt(self, question: str, exemplars: list[Exemplar], context: str | None = None) -> Prompt:
        ctx = f"Context: {wrap_observation(context)}\n" if context else ""
        if self.config.prompt_style == "raw":
            parts = [f"Q: {e.question}\n\n# solution in Python:\n\n\n{e.answer}\n\n\n\n\n" for e in exemplars]
            tail = f"{ctx}Q: {question}\n\n# solution in Python:\n\n\n"
            if self.config.prefill:
                tail += _docstring_line(question)
            return "".join(parts) + tail
        try:
            system = data_path("pal", "pal_gsm8k_chat_beta_system_message.txt").read_text(encoding="utf-8").strip()
            head = data_path("pal", "pal_gsm8k_chat_beta_prompt.txt").read_text(encoding="utf-8").split("\nQ:")[0]
            head = head.strip()
        except Exception:  # noqa: BLE001 - the chat wording is optional; the exemplars are the point
            system, head = CHAT_SYSTEM_FALLBACK, CHAT_HEAD_FALLBACK
        head = re.sub(r"\b(three|\d+) examples\b", f"{len(exemplars)} examples", head) if exemplars else \
            "Let's use python to solve math problems."
        blocks = "".join(f"Q: {e.question}\n```\n{e.answer.rstrip()}\n```\n\n" for e in exemplars)
        user = f"{head}\n{blocks}How about this question?\n{ctx}Q: {question}"
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _decoding(self) -> GenerationConfig:
        c = self.config
        stops = ["\n\n\n", "\nQ:", "\n# solution in Python", "\nif __name__", "\nprint("]
        stops.append("\n```")
        # the grammar's programs never contain these stops (every body line is indented), so they agree
        grammar = pal_grammar(prefilled=c.prefill) if c.constrained else None
        if c.self_consistency > 1:
            return GenerationConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                    n=c.self_consistency, seed=c.seed, stop=stops, grammar=grammar)
        base = c.decoding or greedy_config(c.max_new_tokens, c.seed)
        return with_changes(base, n=1, stop=list(dict.fromkeys([*base.stop, *stops])), grammar=grammar)

    # ------------------------------------------------------------------------------------- run
    def episode(self, question: str, *, context: str | None = None, task: str | None = None) -> EpisodeGen:
        """Solve ``question``; ``context`` (e.g. retrieved text) is shown as data, never as instructions."""
        if not question or not question.strip():
            raise UsageError("the question is empty")
        c = self.config
        t0 = time.perf_counter()
        cfg = self._decoding()
        pool = list(c.exemplars) if c.exemplars is not None else load_pal_exemplars()
        chosen = select_exemplars(pool, min(c.shots, len(pool)), query=question, embedder=c.embedder)
        prefill = ""
        if c.prefill:
            prefill = _docstring_line(question) if c.prompt_style == "raw" else "```\n" + _docstring_line(question)
        extra = 0 if c.prompt_style == "raw" else len(self.policy.tokenize(prefill))  # raw: already in the prompt
        kept, prompt = fit_exemplars(chosen, lambda ex: self.build_prompt(question, ex, context), self.policy,
                                     reserve_tokens=cfg.max_new_tokens + extra)
        # chat style with prefill: the assistant turn is opened by the template and starts with the prefill
        gen_prompt: Prompt = prompt if isinstance(prompt, str) or not prefill else \
            self.policy.render(prompt, add_generation_prompt=True) + prefill
        trace = self._new_trace(question, cfg, task=task, meta={
            "prompt_style": c.prompt_style, "prefill": bool(prefill), "shots_requested": c.shots,
            "shots": len(kept), "exemplar_ids": [e.id for e in kept], "self_consistency": c.self_consistency,
        })
        if context:
            trace.injection_flags = injection_flags(context)
        trace.messages = messages_of(prompt)
        self._emit("start", question, agent=self.kind, prefill=prefill)
        gens = (yield ModelCall(gen_prompt, cfg, step=1))
        n_in = self.policy.count_tokens(gen_prompt)
        answers: list[str | None] = []
        for i, g in enumerate(gens, 1):
            ts = time.perf_counter()
            joined, repairs = join_prefill(prefill, g.text)
            program, more = extract_program(joined)
            repairs += more
            step = Step(index=i, raw_output=g.text, code=program, repairs=repairs,
                        tokens_in=n_in if i == 1 else 0, tokens_out=g.num_tokens)
            own = g.text if isinstance(prompt, str) else prefill + g.text  # chat: the turn includes the prefill
            trace.messages.append(Message(role="assistant", content=own))
            answer = None
            if program is None:
                step.error, step.error_type = "no `def solution():` program in the model's output", "no-program"
                self._emit("error", step.error, i)
            else:
                self._emit("code", program, i)
                res = self.sandbox.run(program, entry="solution")
                if res.ok:
                    answer = format_value(res.value)
                    step.observation = f"solution() returned {res.value!r}"
                    if answer is None:
                        step.error, step.error_type = "solution() returned None", "no-return-value"
                else:
                    step.error_type = res.error_type or "sandbox-error"
                    step.error = f"{res.error_type}: {res.message}"
                    step.observation = step.error
                self._emit("result", step.observation or "", i, ok=bool(res.ok))
            step.seconds = round(time.perf_counter() - ts, 4)
            answers.append(answer)
            trace.steps.append(step)
        winner, votes = majority_vote(answers)
        trace.answer = winner
        # finished: a program written by the model ran and returned a value
        trace.finished = winner is not None
        if len(gens) > 1:
            trace.meta["votes"] = votes
        self._emit("answer", winner or "", len(gens))
        return self._close_trace(trace, t0)
