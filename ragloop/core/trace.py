"""The Trace: the one record that flows from the agents into alignment and onto disk (JSONL).

A Trace holds everything needed to learn from an agent run: the question, the exact messages the policy
saw and produced, the steps (thought, action, observation, retrieved chunk ids, parse repairs, errors),
the final answer, the policy id, decoding settings, seed, timing, and feedback added later (rewards,
critiques, AI preference labels). It is versioned (``schema_version``) so that old files stay readable.

Masking rule used by ``alignment``: a Message with ``role="assistant"`` is the model's own text and is
trained on; every other role — and ``Message.trainable=False`` — is context only (observations, tool
output and retrieved text are never in a loss).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ragloop.core.errors import DataError

TRACE_SCHEMA_VERSION = 1

Role = Literal["system", "user", "assistant", "tool"]


class Message(BaseModel):
    """One chat message, as rendered by the model's chat template."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    # False for assistant-role text that is not the model's own (e.g. a teacher's or a repaired action
    # written by the parser); alignment masks those tokens out of the loss.
    trainable: bool = True


class ToolCall(BaseModel):
    """A tool invocation chosen by the model: tool name and validated arguments."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Step(BaseModel):
    """One iteration of an agent loop (ReAct: thought → action → observation; PAL: code → result)."""

    model_config = ConfigDict(extra="forbid")

    index: int
    thought: str | None = None
    action: ToolCall | None = None
    code: str | None = None
    raw_output: str | None = None  # the model's generation for this step, verbatim
    observation: str | None = None
    retrieved_ids: list[str] = Field(default_factory=list)
    repairs: list[str] = Field(default_factory=list)  # parse repairs applied to the model's text
    error: str | None = None  # model-caused failure (bad format, tool error), recorded, loop goes on
    error_type: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0


class Source(BaseModel):
    """A passage an agent retrieved and showed the model, numbered as the answer cites it (``[n]``).

    ``location`` is human-readable: ``page 3``, ``section "Install"``, ``lines 10-24`` (empty if unknown).
    """

    model_config = ConfigDict(extra="allow")

    n: int
    chunk_id: str
    doc_id: str = ""
    source: str = ""  # the file (or record id) the passage came from
    title: str = ""
    location: str = ""
    score: float | None = None
    cited: bool = False  # the answer cites it as [n]
    text: str = ""  # the passage as retrieved (what groundedness is measured against)


class ModelCallRecord(BaseModel):
    """The tokens of one model call of an episode (``ragloop.agents.runtime``): what RL trains on.

    ``prompt_ids`` are the ids the model was fed; each completion holds its generated ``token_ids`` and their
    ``logprobs`` under the distribution they were sampled from (temperature and grammar mask applied).
    """

    model_config = ConfigDict(extra="forbid")

    step: int = 0
    prompt_ids: list[int] = Field(default_factory=list)
    completions: list[dict[str, Any]] = Field(default_factory=list)
    temperature: float = 0.0
    grammar: str | None = None


class Feedback(BaseModel):
    """Signals attached after the run: rewards, critiques, AI labels, correctness."""

    model_config = ConfigDict(extra="allow")

    correct: bool | None = None
    gold: str | None = None
    rewards: dict[str, float] = Field(default_factory=dict)
    critiques: list[dict[str, Any]] = Field(default_factory=list)
    labels: list[dict[str, Any]] = Field(default_factory=list)


class Trace(BaseModel):
    """A complete, JSON-serialisable record of one agent run."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = TRACE_SCHEMA_VERSION
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    agent: str = ""  # "react" | "pal" | "cot" | ...
    task: str | None = None  # e.g. "gsm8k", "scifact"
    question: str
    messages: list[Message] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    answer: str | None = None
    finished: bool = False  # the agent reached a final answer by its own format (not a fallback)
    fallback: str | None = None  # e.g. "cot-sc" when ReAct fell back
    policy: str = ""  # policy id (name/path/hash)
    decoding: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    started_at: float = Field(default_factory=time.time)
    seconds: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    injection_flags: list[str] = Field(default_factory=list)  # heuristics tripped by context text
    sources: list[Source] = Field(default_factory=list)  # passages retrieved, numbered as cited (schema 1 adds)
    calls: list[ModelCallRecord] = Field(default_factory=list)  # per model call: token ids and log-probs
    feedback: Feedback = Field(default_factory=Feedback)
    meta: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, line: str) -> Trace:
        return cls.model_validate_json(line)


def write_traces(path: str | Path, traces: Iterable[Trace], *, append: bool = False) -> int:
    """Write traces as JSONL (one per line); returns the count. Writes a temp file and renames it
    unless appending, so a crash never leaves a half-written file in place of a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    if append:
        with path.open("a", encoding="utf-8") as f:
            for t in traces:
                f.write(t.to_json() + "\n")
                n += 1
        return n
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for t in traces:
            f.write(t.to_json() + "\n")
            n += 1
    tmp.replace(path)
    return n


def iter_traces(path: str | Path) -> Iterator[Trace]:
    """Read traces from JSONL, raising DataError naming the file and line on the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"trace file not found: {path}", hint="write traces with `ragloop ask ... --save FILE`")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); is it a trace "
                                "file?", hint="traces are JSONL written by `ragloop ask ... --save FILE` or eval "
                                "--out") from None
            if not line.strip():
                continue
            try:
                yield Trace.model_validate_json(line)
            except ValidationError as e:
                first = e.errors()[0]
                loc = ".".join(str(p) for p in first.get("loc", ()))
                raise DataError(f"{path}:{lineno}: not a valid trace ({loc}: {first.get('msg')})") from None


def read_traces(path: str | Path) -> list[Trace]:
    return list(iter_traces(path))


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
