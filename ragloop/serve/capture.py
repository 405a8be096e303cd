"""Trace capture: every call the server answers, written as a ``Trace`` that alignment can learn from.

``ragloop serve --capture DIR`` appends one ``Trace`` per returned choice to ``DIR/traces.jsonl``: the
messages as the model saw them (tools and schema instructions included), the generated text as the one
trainable assistant message (earlier assistant turns sent by the client are context, ``trainable=False``),
the decoding settings, seed, timing and token counts, and in ``meta`` the generated token ids, their
log-probabilities, the finish reason, the endpoint and the request id. A raw ``/v1/completions`` prompt
is recorded with ``meta["prompt_style"] = "raw"``, which SFT renders as plain text instead of a chat.

So an unmodified ``openai``-client program pointed at ``ragloop serve`` produces training data:
``ragloop train sft --traces DIR/traces.jsonl --all-traces --out ckpt/sft`` (``--all-traces`` because
captured calls carry no correctness judgement). Lines are appended under a lock and flushed one whole
line at a time, so a crash loses at most the line being written.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from ragloop.core.trace import Message, Trace
from ragloop.models.types import Generation, GenerationConfig

TRACE_FILE = "traces.jsonl"
_ROLES = {"system", "user", "assistant", "tool"}


class TraceCapture:
    """Append-only JSONL of served calls (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / TRACE_FILE
        self._lock = threading.Lock()
        self.written = 0

    def record(
        self,
        *,
        endpoint: str,
        request_id: str,
        policy: str,
        prompt: list[dict[str, str]] | str,
        generations: list[Generation],
        texts: list[str],
        cfg: GenerationConfig,
        started: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """One trace per candidate; ``texts[i]`` is what the client received for ``generations[i]``."""
        seconds = time.time() - started
        decoding = cfg.to_dict()
        lines = []
        for i, (g, text) in enumerate(zip(generations, texts, strict=True)):
            if isinstance(prompt, str):
                msgs = [Message(role="user", content=prompt), Message(role="assistant", content=text)]
                question, style = prompt, "raw"
            else:
                msgs = [
                    Message(role=m["role"] if m["role"] in _ROLES else "system", content=m["content"],
                            trainable=False)
                    for m in prompt
                ]
                msgs.append(Message(role="assistant", content=text))
                users = [m["content"] for m in prompt if m["role"] == "user"]
                question, style = (users[-1] if users else ""), "chat"
            trace = Trace(
                agent="serve",
                question=question,
                messages=msgs,
                answer=text,
                finished=True,
                policy=policy,
                decoding=decoding,
                seed=cfg.seed,
                started_at=started,
                seconds=seconds,
                tokens_in=g.prompt_tokens,
                tokens_out=g.num_tokens,
                meta={
                    "endpoint": endpoint,
                    "request_id": request_id,
                    "choice": i,
                    "prompt_style": style,
                    "finish_reason": g.finish_reason,
                    "token_ids": list(g.token_ids),
                    "logprobs": list(g.logprobs) if g.logprobs is not None else None,
                    **(extra or {}),
                },
            )
            lines.append(trace.to_json() + "\n")
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.flush()
            self.written += len(lines)
