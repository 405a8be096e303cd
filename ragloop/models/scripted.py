"""A scripted policy: a deterministic stand-in for a language model, for testing the logic around it.

``ScriptedPolicy`` implements the ``Policy`` protocol (``ragloop.models.types``) from either a list of
canned responses (consumed in order, one per candidate) or a callable ``(prompt_text, cfg) -> str`` that
decides what to "generate" from what it reads — e.g. a fake model that obeys any instruction planted in
a retrieved document (SECURITY.md §4). It behaves like a real decoder where agents depend on it:

- stop sequences end the text *before* the first stop string (``finish_reason="stop"``);
- ``max_new_tokens`` cuts the text after that many tokens (``finish_reason="length"``);
- a prompt that does not fit ``context_window`` raises ``ContextWindowError``;
- every prompt it saw is recorded in ``.calls`` for assertions.

Tokenizer: a regex split into words, single punctuation marks and runs of whitespace, so that
``detokenize(tokenize(s)) == s`` for every string; ids come from a per-instance vocabulary that grows
as new pieces are seen (no global state).

Example::

    >>> p = ScriptedPolicy(["Thought 1: hi\\nAction 1: Finish[4]\\nObservation 1: x"])
    >>> p.generate("Q", GenerationConfig(stop=["\\nObservation"]))[0].text
    'Thought 1: hi\\nAction 1: Finish[4]'
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ragloop.core.errors import ContextWindowError, UsageError
from ragloop.models.types import (
    ChatMessages,
    FinishReason,
    Generation,
    GenerationConfig,
    Prompt,
    as_messages,
)

Responder = Callable[[str, GenerationConfig], str]

# words, single non-space non-word characters, and whitespace runs: lossless by construction
_TOKEN_RE = re.compile(r"\w+|[^\w\s]|\s+", re.UNICODE)


def split_tokens(text: str) -> list[str]:
    """The scripted tokenizer's pieces: ``split_tokens("a, b") -> ['a', ',', ' ', 'b']``."""
    return _TOKEN_RE.findall(text)


def render_chatml(messages: ChatMessages, *, add_generation_prompt: bool = True) -> str:
    """A ChatML-like rendering: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in as_messages(messages))
    if add_generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found:
    ``cut_at_stop("a\\nObs b", ["\\nObs"]) -> ("a", True)``."""
    best = -1
    for s in stop:
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best = i
    return (text, False) if best == -1 else (text[:best], True)


@dataclass
class ScriptedCall:
    """One call the policy answered: the prompt as given, its rendered text, and the settings."""

    prompt: Prompt
    text: str
    cfg: GenerationConfig
    outputs: list[str] = field(default_factory=list)


class ScriptedPolicy:
    """A deterministic policy that answers from a script (see the module docstring).

    ``responses``: a list of strings, consumed one per candidate in call order (``cfg.n`` candidates
    consume ``n`` responses), or a callable ``(prompt_text, cfg) -> str`` called once per candidate.
    ``default``: returned once the list is used up; without it, running out raises ``UsageError`` so a
    test that makes more calls than it scripted fails loudly.
    """

    def __init__(
        self,
        responses: Sequence[str] | Responder,
        *,
        name: str = "scripted",
        context_window: int = 8192,
        default: str | None = None,
    ) -> None:
        if callable(responses):
            self._responder: Responder | None = responses
            self._script: list[str] = []
        else:
            if isinstance(responses, str):
                raise UsageError("ScriptedPolicy takes a list of responses or a callable, not one string")
            self._responder = None
            self._script = [str(r) for r in responses]
        if context_window < 2:
            raise UsageError(f"context_window must be >= 2, got {context_window}")
        self.name = name
        self.context_window = context_window
        self.default = default
        self.calls: list[ScriptedCall] = []
        self._cursor = 0
        self._vocab: dict[str, int] = {}
        self._pieces: list[str] = []

    # ----------------------------------------------------------------------------------- tokenizer
    def tokenize(self, text: str) -> list[int]:
        ids = []
        for piece in split_tokens(text):
            tid = self._vocab.get(piece)
            if tid is None:
                tid = len(self._pieces)
                self._vocab[piece] = tid
                self._pieces.append(piece)
            ids.append(tid)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self._pieces[i] for i in ids)
        except IndexError:
            raise UsageError(f"unknown token id in {list(ids)!r}") from None

    def render(self, messages: ChatMessages, *, add_generation_prompt: bool = True) -> str:
        return render_chatml(messages, add_generation_prompt=add_generation_prompt)

    def prompt_text(self, prompt: Prompt) -> str:
        """A raw string as is; chat messages rendered with the template."""
        return prompt if isinstance(prompt, str) else self.render(prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(split_tokens(self.prompt_text(prompt)))

    # ---------------------------------------------------------------------------------- generation
    @property
    def prompts(self) -> list[str]:
        """The rendered text of every prompt seen, in order."""
        return [c.text for c in self.calls]

    @property
    def remaining(self) -> int:
        """Scripted responses not used yet (0 for a callable script)."""
        return max(0, len(self._script) - self._cursor)

    def _next_response(self, text: str, cfg: GenerationConfig) -> str:
        if self._responder is not None:
            out = self._responder(text, cfg)
            if not isinstance(out, str):
                raise UsageError(f"a scripted responder must return str, got {type(out).__name__}")
            return out
        if self._cursor < len(self._script):
            self._cursor += 1
            return self._script[self._cursor - 1]
        if self.default is not None:
            return self.default
        raise UsageError(
            f"scripted policy ran out of responses after {len(self._script)} "
            f"(call {len(self.calls)}; last prompt ends with {text[-80:]!r})",
            hint="give more responses or a `default=`",
        )

    def _check_fits(self, text: str, cfg: GenerationConfig) -> int:
        n_prompt = len(split_tokens(text))
        if n_prompt + cfg.max_new_tokens > self.context_window:
            raise ContextWindowError(
                f"prompt of {n_prompt} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the context "
                f"window of {self.context_window} by {n_prompt + cfg.max_new_tokens - self.context_window}",
                hint="shorten the prompt or lower max_new_tokens",
            )
        return n_prompt

    def _finish(self, raw: str, cfg: GenerationConfig, n_prompt: int, prompt_text: str) -> Generation:
        text, stopped = cut_at_stop(raw, cfg.stop)
        pieces = split_tokens(text)
        reason: FinishReason = "stop" if stopped else "eos"
        if len(pieces) > cfg.max_new_tokens:
            pieces = pieces[: cfg.max_new_tokens]
            text = "".join(pieces)
            reason = "length"
        ids = self.tokenize(text)
        lps = self._logprobs(prompt_text, pieces) if cfg.logprobs else None
        return Generation(text=text, token_ids=ids, finish_reason=reason, logprobs=lps, prompt_tokens=n_prompt)

    def generate(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> list[Generation]:
        cfg = cfg or GenerationConfig()
        text = self.prompt_text(prompt)
        n_prompt = self._check_fits(text, cfg)
        call = ScriptedCall(prompt=prompt, text=text, cfg=cfg)
        self.calls.append(call)
        gens = []
        for _ in range(cfg.n):
            raw = self._next_response(text, cfg)
            call.outputs.append(raw)
            gens.append(self._finish(raw, cfg, n_prompt, text))
        return gens

    def generate_batch(
        self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None
    ) -> list[list[Generation]]:
        return [self.generate(p, cfg) for p in prompts]

    def stream(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> Iterator[str]:
        cfg = cfg or GenerationConfig()
        if cfg.n != 1:
            raise UsageError(f"stream produces one candidate; got n={cfg.n}")
        gen = self.generate(prompt, cfg)[0]
        yield from split_tokens(gen.text)

    # ------------------------------------------------------------------------------------- scoring
    @staticmethod
    def _logprob(context: str, piece: str) -> float:
        # a stable pseudo log-probability in [-5, -0.01): same inputs, same value, across processes
        h = zlib.crc32((context[-64:] + "\x00" + piece).encode("utf-8")) / 2**32
        return -0.01 - h * 4.99

    def _logprobs(self, prompt_text: str, pieces: Sequence[str]) -> list[float]:
        out, ctx = [], prompt_text
        for p in pieces:
            out.append(self._logprob(ctx, p))
            ctx += p
        return out

    def score(self, prompt: Prompt, continuation: str) -> list[float]:
        return self._logprobs(self.prompt_text(prompt), split_tokens(continuation))
