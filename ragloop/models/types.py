"""The policy interface shared by every backend and every caller.

- ``GenerationConfig``: decoding settings, validated on construction (a bad value is a UsageError naming
  the option and its valid range).
- ``Generation``: one generated candidate: text, token ids, per-token log-probabilities, finish reason.
- ``Policy``: the protocol agents and alignment program against. Backends: the local HF/torch policy
  (``ragloop.models.local``), a scripted policy for tests (``ragloop.models.scripted``), and later an
  OpenAI-compatible HTTP server.

A *prompt* is either a list of chat messages (rendered with the model's chat template — the one renderer
used at inference and in training) or a raw string (a plain completion, no template).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ragloop.core.errors import UsageError
from ragloop.core.trace import Message

ChatMessages = Sequence[Message | dict[str, str]]
Prompt = str | ChatMessages

FinishReason = Literal["stop", "length", "eos"]
GrammarKind = Literal["regex", "lark", "json_schema"]


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on what one generation may contain (grammar-constrained decoding).

    ``kind`` says how ``source`` is written: a regular expression, a Lark grammar, or a JSON schema (as a
    JSON string). The decoder compiles it once per tokenizer (``ragloop.models.grammar``) and gives every
    row its own matcher, so rows with different grammars share one batch. ``name`` is a short label
    recorded in Traces ("react-paper", "pal", "json:get_weather").
    """

    kind: GrammarKind
    source: str
    name: str = ""


@dataclass
class GenerationConfig:
    """Decoding settings.

    ``greedy=True`` (or ``temperature == 0``) picks the arg-max token; otherwise tokens are sampled from the
    softmax of ``logits / temperature`` restricted to the ``top_k`` most likely tokens (0 = no limit) and
    to the smallest set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020).
    """

    max_new_tokens: int = 256  # generated tokens at most (the prompt is not counted)
    temperature: float = 1.0  # > 0; 0 means greedy
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # in (0, 1]; 1 = disabled
    greedy: bool = False
    stop: list[str] = field(default_factory=list)  # generation ends before the first stop string
    n: int = 1  # candidates per prompt (sampled as one batch)
    seed: int | None = None  # same seed + same settings → same text
    repetition_penalty: float = 1.0  # CTRL-style (Keskar et al. 2019); 1 = off
    logprobs: bool = False  # return per-token log-probabilities of the generated tokens
    grammar: GrammarSpec | None = None  # constrain every candidate to this grammar (None = free text)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0) or self.temperature != self.temperature:
            raise UsageError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise UsageError(f"n must be a positive integer, got {self.n!r}")
        if not (self.repetition_penalty > 0):
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise UsageError("stop sequences must be non-empty strings")
        if self.temperature == 0:
            self.greedy = True
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise UsageError(f"grammar must be a GrammarSpec, got {type(self.grammar).__name__}")

    @property
    def do_sample(self) -> bool:
        return not self.greedy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """One generated candidate."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None  # one per token in token_ids (natural log)
    prompt_tokens: int = 0
    # log softmax(logits / temperature) of each token (temperature 1 when greedy): PPO's rollout log-prob.
    # ``logprobs`` above are under the raw model distribution (temperature 1). Neither includes top-k/top-p.
    scaled_logprobs: list[float] | None = None
    # the prompt's token ids as the model saw them (set by local decoding; shared, do not modify)
    prompt_ids: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Policy(Protocol):
    """What agents and alignment need from a language model."""

    name: str  # a stable id recorded in every Trace
    context_window: int  # tokens (prompt + generation)

    def render(self, messages: ChatMessages, *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (the one renderer shared with training)."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens of a raw string or of rendered chat messages (with the generation prompt)."""
        ...

    def generate(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> list[Generation]:
        """``cfg.n`` candidates for one prompt. Raises ContextWindowError if it cannot fit."""
        ...

    def generate_batch(
        self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None
    ) -> list[list[Generation]]:
        """``cfg.n`` candidates for each of many prompts, batched."""
        ...

    def stream(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Yield text pieces of one candidate as they are decoded (n must be 1)."""
        ...

    def score(self, prompt: Prompt, continuation: str) -> list[float]:
        """Per-token log-probabilities of ``continuation`` given ``prompt`` (teacher forcing)."""
        ...


def as_messages(messages: ChatMessages) -> list[dict[str, str]]:
    """Normalise Message objects / dicts to plain ``{"role", "content"}`` dicts."""
    out: list[dict[str, str]] = []
    for m in messages:
        if isinstance(m, Message):
            out.append({"role": m.role, "content": m.content})
        elif isinstance(m, dict) and "role" in m and "content" in m:
            out.append({"role": str(m["role"]), "content": str(m["content"])})
        else:
            raise UsageError(f"a chat message must have 'role' and 'content', got {m!r}")
    return out
