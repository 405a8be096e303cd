"""``LocalPolicy``: a transformers causal LM + its tokenizer behind the ``Policy`` protocol.

It owns nothing global: the model and tokenizer are passed in (``load_policy`` in ``loading`` builds them
from a spec; tests wrap a tiny random model with ``LocalPolicy.from_model``). Alignment trains
``policy.model`` in place; generation always sees the current weights.

Decoding runs on the policy's ``ragloop.models.engine.DecodeEngine`` (continuous batching: calls from any
number of threads are decoded together, and greedy results equal sequential ones) over a *stepper* (the
forward pass with a KV cache):
``backend="hf"`` uses the transformers model itself (``HFStepper``); ``"fast"`` uses
``ragloop.models.fast.make_stepper(model)``; ``"auto"`` (default) uses the fast path when that module is
present and supports the model, else the reference. A fast stepper is rebuilt whenever the weights change
(it may hold a repacked copy of them).

``precision`` picks the fast path's matmul weights: "fp32" (default; greedy tokens identical to the
reference), or the reduced "bf16", "int8", "int4" (faster; quality measured by ``benchmarks/bench_decode.py``
— next-token agreement with fp32 and PAL accuracy — and recorded in ``benchmarks/RESULTS.md``). It applies
to decoding only: ``score``/``logprobs_of`` and training always run the model's own fp32 forward pass. A
reduced precision needs the fast path, so it refuses ``backend="hf"`` and never falls back silently.
"auto" resolves to this CPU's fastest precision that passed the quality gate (``ragloop.models.cpu``; int4
only for weights on a 4-bit grid, re-resolved when the weights change, fp32 where the fast path does not
apply); ``precision`` then holds the resolved value and ``requested_precision`` says "auto".
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ragloop.core.errors import RagloopError, UsageError
from ragloop.models.chat import check_fits, render_messages
from ragloop.models.decoding import HFStepper, Stepper, left_pad, sequence_logprobs
from ragloop.models.engine import DecodeEngine, Ticket
from ragloop.models.tokenizer import decode as tokenizer_decode
from ragloop.models.tokenizer import encode as tokenizer_encode
from ragloop.models.types import ChatMessages, Generation, GenerationConfig, Prompt, as_messages

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "fast")
PRECISIONS = ("auto", "fp32", "bf16", "int8", "int4")  # "auto": ragloop.models.cpu.resolve_precision


def _end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the config's and tokenizer's EOS, ChatML's ``<|im_end|>``, ``<|endoftext|>``."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for s in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"):
        if s in vocab:
            ids.add(int(vocab[s]))
    return ids


class LocalPolicy:
    """A local causal LM as a ``Policy``. See the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        context_window: int | None = None,
        backend: str = "auto",
        max_batch_rows: int = 64,
        precision: str = "fp32",
    ) -> None:
        if backend not in BACKENDS:
            raise UsageError(f"unknown decode backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise UsageError(f"unknown decode precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision not in ("fp32", "auto") and backend == "hf":
            raise UsageError(f"precision {precision} needs the fast decode path, not backend 'hf'",
                             hint="use --backend auto (or fast), or --precision fp32")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        cw = context_window or getattr(model.config, "max_position_embeddings", None)
        if not cw:
            raise UsageError(f"cannot tell the context window of {name}; pass context_window=")
        self.context_window = int(cw)
        self.backend = backend
        self.requested_precision = precision  # as asked: "auto" or a precision
        self.precision = self._resolve_precision()  # what decoding uses (recorded in every Trace)
        self.max_batch_rows = max_batch_rows
        self.end_ids = _end_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.end_ids))
        self._stepper: Stepper | None = None
        self._stepper_key: Any = None
        self._engine: DecodeEngine | None = None
        self._engine_lock = threading.Lock()

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "local",
        context_window: int | None = None,
        backend: str = "auto",
        precision: str = "fp32",
    ) -> LocalPolicy:
        """Wrap an in-memory model and tokenizer (e.g. ``build_tiny_llama``'s) as a policy."""
        from ragloop.models.chat import ensure_chat_template

        ensure_chat_template(tokenizer)
        return cls(model, tokenizer, name=name, context_window=context_window, backend=backend, precision=precision)

    def __repr__(self) -> str:
        extra = f", precision={self.precision!r}" if self.precision != "fp32" else ""
        extra += " (auto)" if self.requested_precision == "auto" else ""
        return (f"LocalPolicy(name={self.name!r}, context_window={self.context_window}, "
                f"backend={self.backend!r}{extra})")

    # -- text ----------------------------------------------------------------------------------------------

    def render(self, messages: ChatMessages, *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` — the one renderer agents and training share."""
        return render_messages(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in it become control tokens; no BOS is added)."""
        return tokenizer_encode(self.tokenizer, text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return tokenizer_decode(self.tokenizer, ids)

    def encode(self, prompt: Prompt) -> list[int]:
        """The exact ids the model is fed for ``prompt``: a raw string as is, messages through ``render``."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("the prompt is empty", hint="give some text to continue")
            return self.tokenize(prompt)
        msgs = as_messages(prompt)
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise UsageError("the prompt is empty", hint="give at least one message with some content")
        return self.tokenize(self.render(msgs))

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.encode(prompt))

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextWindowError (with the numbers) unless prompt + generation fit the context window."""
        check_fits(prompt_tokens, max_new_tokens, self.context_window)

    # -- decoding ------------------------------------------------------------------------------------------

    def _weights_key(self) -> tuple[int, ...]:
        # in-place updates (optimizer steps, load_state_dict) bump a tensor's _version; .to() moves data_ptr
        return tuple(x for p in self.model.parameters() for x in (p.data_ptr(), p._version))

    def stepper(self, rows: int = 1, max_len: int = 0) -> Stepper:
        """The forward pass for a decode of ``rows`` sequences up to ``max_len`` tokens: the fast one when
        chosen, available and large enough (built once, rebuilt after the weights change), else the reference."""
        if self.backend == "hf":
            return HFStepper(self.model)
        key = self._weights_key()
        if self._stepper is None or key != self._stepper_key:
            fast = self._make_fast_stepper()
            self._stepper = fast if fast is not None else HFStepper(self.model)
            self._stepper_key = key
        if isinstance(self._stepper, HFStepper):
            return HFStepper(self.model)
        too_big = rows > getattr(self._stepper, "max_batch", rows) or max_len > getattr(
            self._stepper, "max_seq_len", max_len
        )
        if too_big:
            if self.backend == "fast":
                raise UsageError(f"the fast decode path cannot hold {rows} rows of {max_len} tokens")
            if self.precision != "fp32":
                log.warning("%d rows of %d tokens exceed the fast path; decoding them in fp32 instead of %s",
                            rows, max_len, self.precision)
            return HFStepper(self.model)
        return self._stepper

    def _resolve_precision(self) -> str:
        """``requested_precision`` itself, or for "auto" this CPU's choice (``cpu.resolve_precision``) for
        these weights: fp32 where the fast path does not apply, never int4 for weights off a 4-bit grid."""
        if self.requested_precision != "auto":
            return self.requested_precision
        if self.backend == "hf":
            return "fp32"
        try:
            fast = importlib.import_module("ragloop.models.fast")
            fast.check_supported(self.model)
        except (ModuleNotFoundError, RagloopError):
            return "fp32"
        from ragloop.models.cpu import resolve_precision

        resolved = resolve_precision("auto", q4_grid=fast.weights_on_int4_grid(self.model))
        if resolved != getattr(self, "precision", None):  # said once, and again only when it changes
            log.info("precision auto -> %s", resolved)
        return resolved

    def _make_fast_stepper(self) -> Stepper | None:
        if self.requested_precision == "auto":
            self.precision = self._resolve_precision()  # the weights changed: int4 may no longer be exact
        # an explicit reduced precision never falls back silently; "auto" falls back to fp32 (and says so)
        strict = self.backend == "fast" or self.requested_precision not in ("fp32", "auto")
        try:
            fast = importlib.import_module("ragloop.models.fast")
        except ModuleNotFoundError as e:
            if e.name != "ragloop.models.fast" or strict:
                raise UsageError("the fast decode path (ragloop.models.fast) is not available") from None
            self.precision = "fp32"
            return None
        try:
            stepper = fast.make_stepper(self.model, precision=self.precision, max_batch=self.max_batch_rows)
        except (RagloopError, NotImplementedError, ValueError, TypeError) as e:
            if strict:
                raise UsageError(f"the fast decode path does not support {self.name}: {e}") from None
            log.info("fast decode path unavailable for %s (%s); using transformers", self.name, e)
            self.precision = "fp32"
            return None
        if stepper is None and strict:
            raise UsageError(f"the fast decode path does not support {self.name}")
        return stepper

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = bool(getattr(self.model, "training", False))
        if was_training:
            self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    def _encode_checked(self, prompts: Sequence[Prompt], cfg: GenerationConfig) -> list[list[int]]:
        encoded = []
        for i, p in enumerate(prompts):
            ids = self.encode(p)
            try:
                self.check_fits(len(ids), cfg.max_new_tokens)
            except UsageError as e:
                if len(prompts) > 1:
                    e.message = f"prompt {i}: {e.message}"
                    e.args = (e.message,)
                raise
            encoded.append(ids)
        return encoded

    def _engine_for_decoding(self) -> DecodeEngine:
        """The one decode engine of this policy (built on first use; see ``ragloop.models.engine``)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = DecodeEngine(
                        self.stepper, tokenizer=self.tokenizer, end_ids=self.end_ids, pad_id=self.pad_id,
                        max_rows=self.max_batch_rows, context=self._eval_mode,
                        grammar_compiler=self._compile_grammar,
                    )
        return self._engine

    def _compile_grammar(self, spec: Any) -> Any:
        from ragloop.models import grammar

        return grammar.matcher_for(spec, self.tokenizer)

    def submit(
        self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None, *, stream: bool = False
    ) -> Ticket:
        """Queue ``cfg.n`` candidates for each prompt on the policy's decode engine and return the ``Ticket``.

        Requests from any number of threads (and any number of tickets from one thread) are decoded together;
        ``ticket.results()`` waits for (and helps drive) this one. Rows are ``prompt_index * n + candidate``.
        The prompts are checked against the context window here.
        """
        cfg = cfg or GenerationConfig()
        if isinstance(prompts, str):
            raise UsageError("submit takes a list of prompts, not one string")
        encoded = self._encode_checked(prompts, cfg)
        return self._engine_for_decoding().submit(encoded, cfg, stream=stream)

    def decode_run(self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None) -> Ticket:
        """A lazy batched decode: iterate it for ``(row, text)`` pieces, then call ``.results()``."""
        return self.submit(prompts, cfg, stream=True)

    def generate(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> list[Generation]:
        """``cfg.n`` candidates for one prompt (sampled as one batch)."""
        return self.generate_batch([prompt], cfg)[0]

    def generate_batch(
        self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None
    ) -> list[list[Generation]]:
        """``cfg.n`` candidates for each prompt, decoded together (with any other thread's requests)."""
        if isinstance(prompts, str):
            raise UsageError("generate_batch takes a list of prompts, not one string")
        if not prompts:
            return []
        return self.submit(prompts, cfg).results()

    def stream(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Text pieces of one candidate as they are decoded; their concatenation equals ``generate``'s text.

        Text that might still turn out to be part of a stop string is held back until it cannot.
        """
        cfg = cfg or GenerationConfig()
        if cfg.n != 1:
            raise UsageError(f"streaming produces one candidate; got n={cfg.n}", hint="use n=1 to stream")
        ticket = self.submit([prompt], cfg, stream=True)
        try:
            for _, piece in ticket:
                yield piece
        finally:
            if not ticket.done:  # the consumer stopped early: release the row's slot
                ticket.cancel()

    # -- scoring -------------------------------------------------------------------------------------------

    def score(self, prompt: Prompt, continuation: str) -> list[float]:
        """Per-token log-probabilities (raw model distribution) of ``continuation``'s tokens after ``prompt``."""
        p_ids = self.encode(prompt)
        c_ids = self.tokenize(continuation)
        if not c_ids:
            return []
        self.check_fits(len(p_ids) + len(c_ids), 0)
        ids = torch.tensor([p_ids + c_ids], dtype=torch.long)  # (1, T)
        lp = self.logprobs_of(ids)  # (1, T)
        return lp[0, len(p_ids) :].tolist()

    def logprobs_of(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        grad: bool = False,
    ) -> torch.Tensor:
        """Teacher-forced log-probs for PPO: ``(B, T)`` ids (+ mask, left or right padded) → ``(B, T)``.

        ``out[b, t] = log softmax(logits_{t-1} / temperature)[ids[b, t]]``; ``out[:, 0]`` and pads are 0.
        With the sampling temperature this reproduces a rollout's ``Generation.scaled_logprobs``; with 1,
        its ``logprobs``. ``grad=True`` keeps the graph (the PPO loss); otherwise runs without gradients.
        """
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        if grad:
            return sequence_logprobs(self.model, input_ids, attention_mask, temperature=temperature)
        with torch.no_grad(), self._eval_mode():
            return sequence_logprobs(self.model, input_ids, attention_mask, temperature=temperature)

    def batch_inputs(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` for id lists, with this policy's pad token."""
        return left_pad(seqs, self.pad_id)
