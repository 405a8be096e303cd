"""The decode loop: batched, streaming, stop-aware autoregressive generation over a pluggable forward pass.

- ``Stepper``: the forward pass the loop drives. ``prefill(input_ids, attention_mask)`` takes a left-padded
  ``(B, T)`` batch, (re)fills a KV cache and returns the ``(B, V)`` logits at the last position;
  ``step(next_ids)`` feeds the ``(B,)`` tokens just chosen and returns the next ``(B, V)`` logits.
  ``HFStepper`` is the reference (the transformers model with a ``DynamicCache``); a faster forward
  (``ragloop.models.fast.make_stepper``) plugs in with the same two methods.
- ``IncrementalDetokenizer`` (defined in ``ragloop.models.tokenizer``, importable from here too): token ids
  → text as they arrive, holding back a multi-byte character split across tokens until it is complete.
- ``DecodeRun``: one batched decode of ``len(prompts) × n`` rows. It yields ``(row, text)`` pieces that are
  safe to show (never part of a stop string: a suffix that could still become one is held back) and ends
  with ``results()``: one ``Generation`` per row.
- ``sequence_logprobs``: teacher-forced per-token log-probabilities of whole sequences (for ``score`` and for
  PPO's training forward pass), with the same position ids as decoding.

Conventions (documented once here):
- ``Generation.text`` is the decoded text before any stop string / end token. ``token_ids`` are the
  generated tokens that lie wholly before the cut, plus the end-of-sequence token when the model emitted
  one (``finish_reason="eos"``: PPO must learn to stop, so that token keeps its log-prob). A token that
  straddles a stop string's first character is dropped, so ``detokenize(token_ids)`` can be a few
  characters shorter than ``text`` in that (rare) case, never longer.
- ``Generation.logprobs`` are log-probabilities under the *raw* model distribution ``log softmax(logits)``
  — what a plain forward pass on prompt + generation gives. ``Generation.scaled_logprobs`` are under
  ``log softmax(logits / temperature)`` (the sampling temperature; 1 for greedy), i.e. PPO's rollout
  log-prob of the sampled token. Neither includes top-k / top-p truncation or the repetition penalty.
- Candidate ``j`` of prompt ``i`` samples from its own generator seeded by ``(seed, i, j)``, so it does not
  depend on ``n``, on the batch size or on the other rows (only on float noise from padding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ragloop.models.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer  # noqa: F401 (moved there; re-exported)
from ragloop.models.types import Generation, GenerationConfig


@runtime_checkable
class Stepper(Protocol):
    """A forward pass with a KV cache, as the decode loop drives it."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` left-padded ids and mask → ``(B, V)`` logits at the last position; resets the cache."""
        ...

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` tokens just chosen → ``(B, V)`` logits for the position after them."""
        ...


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(ids, mask)``: ``left_pad([[5, 6], [7]], 0) -> ([[5, 6], [0, 7]], [[1, 1], [0, 1]])``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (pads get 0): ``[[0, 1, 1]] -> [[0, 0, 1]]``."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


class HFStepper:
    """The reference forward pass: the transformers model itself with a dynamic KV cache."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        device = self.model.device
        input_ids = input_ids.to(device)
        self._mask = attention_mask.long().to(device)  # (B, T)
        pos = position_ids_from_mask(self._mask)  # (B, T)
        self._cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=pos,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = out.past_key_values
        self._next_pos = pos[:, -1] + 1  # (B,)
        return out.logits[:, -1, :].float()  # (B, V)

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._next_pos is None:
            raise RuntimeError("step() before prefill()")
        next_ids = next_ids.to(self._mask.device)
        ones = torch.ones((self._mask.shape[0], 1), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)  # (B, T + 1)
        out = self.model(
            input_ids=next_ids.view(-1, 1),  # (B, 1)
            attention_mask=self._mask,
            position_ids=self._next_pos.view(-1, 1),  # (B, 1)
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache = out.past_key_values
        self._next_pos = self._next_pos + 1
        return out.logits[:, -1, :].float()  # (B, V)


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher-forced ``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` under ``logits / temperature``.

    ``(B, T)`` ids and mask (left or right padding) → ``(B, T)`` float32; ``out[:, 0]`` and padded positions
    are 0. Position ids come from the mask exactly as in decoding, so these values agree with the
    ``logprobs`` a decode returned. Differentiable: wrap in ``torch.no_grad()`` when you only need values.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.long()  # (B, T)
    logits = model(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
    ).logits  # (B, T, V)
    logits = logits[:, :-1, :].float()  # (B, T-1, V) predicts tokens 1..T-1
    if temperature != 1.0:
        logits = logits / temperature
    target = input_ids[:, 1:]  # (B, T-1)
    picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()  # (B, T-1) a real token after a real token
    picked = picked.masked_fill(~valid, 0.0)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)  # (B, T)


# --------------------------------------------------------------------------------------------------------
# text: stop strings


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in ``text[start:]`` (absolute), or -1:
    ``find_stop("a\\nObs b", ["\\nObs", "b"]) -> 1``."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (to hold back while
    streaming): ``stop_holdback("Answer\\nObs", ["\\nObservation:"]) -> 4``."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# --------------------------------------------------------------------------------------------------------
# the loop


def derive_seed(seed: int, prompt_index: int, candidate: int) -> int:
    """The seed of one row under a user seed (independent streams via numpy's SeedSequence)."""
    entropy = [int(seed) % 2**63, prompt_index, candidate]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class DecodeRun:
    """One batched decode of ``len(prompts) × cfg.n`` rows (row ``i * n + j`` = prompt ``i``, candidate ``j``)
    over a given stepper: the decode engine's loop (``ragloop.models.engine``) with this one request.

    Iterate it to receive ``(row, text_piece)`` as text becomes safe to show; ``results()`` runs it to the
    end (if not yet) and returns ``[[Generation] * n] * len(prompts)``. Policies decode through their own
    engine (``LocalPolicy.submit``); this is for a stepper used directly (tests, benchmarks, seq2seq).
    """

    def __init__(
        self,
        stepper: Stepper,
        prompts: Sequence[Sequence[int]],
        cfg: GenerationConfig,
        *,
        tokenizer: Any,
        end_ids: set[int],
        pad_id: int,
        prompt_offset: int = 0,
    ) -> None:
        from ragloop.models.engine import DecodeEngine

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.stepper, self.cfg = stepper, cfg

        def compile_grammar(spec: Any) -> Any:
            from ragloop.models import grammar

            return grammar.matcher_for(spec, tokenizer)

        engine = DecodeEngine(lambda rows, max_len: stepper, tokenizer=tokenizer, end_ids=end_ids, pad_id=pad_id,
                              max_rows=len(prompts) * cfg.n, grammar_compiler=compile_grammar)
        self._ticket = engine.submit(prompts, cfg, prompt_offset=prompt_offset, stream=True)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._ticket)

    def results(self) -> list[list[Generation]]:
        """Run to the end (resuming a partly consumed iteration) and return the generations per prompt."""
        return self._ticket.results()
