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

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ragloop.models import sampling
from ragloop.models.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer  # noqa: F401 (moved there; re-exported)
from ragloop.models.types import FinishReason, Generation, GenerationConfig


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


def grammar_matchers(cfg: GenerationConfig, rows: int, tokenizer: Any) -> list[Any] | None:
    """One fresh grammar matcher per row when ``cfg.grammar`` is set (``ragloop.models.grammar``), else None.
    The grammar may end with the tokenizer's end-of-sequence token (as in the decode engine)."""
    if cfg.grammar is None:
        return None
    from ragloop.models import grammar

    return [grammar.matcher_for(cfg.grammar, tokenizer) for _ in range(rows)]


def mask_logits(logits: torch.Tensor, matchers: Sequence[Any] | None) -> torch.Tensor:
    """``logits`` ``(R, V)`` with -inf outside each row's grammar (a masked copy; the input when no grammar)."""
    if matchers is None:
        return logits
    from ragloop.models import grammar

    return grammar.apply_masks(logits.clone(), matchers)


def derive_seed(seed: int, prompt_index: int, candidate: int) -> int:
    """The seed of one row under a user seed (independent streams via numpy's SeedSequence)."""
    entropy = [int(seed) % 2**63, prompt_index, candidate]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class _Row:
    prompt_index: int
    candidate: int
    prompt_tokens: int
    detok: IncrementalDetokenizer
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    scaled: list[float] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # text length after each token; -1 while a char is pending
    text: str = ""
    emitted: int = 0
    finish: FinishReason | None = None


class DecodeRun:
    """One batched decode of ``len(prompts) × cfg.n`` rows (row ``i * n + j`` = prompt ``i``, candidate ``j``).

    Iterate it to receive ``(row, text_piece)`` as text becomes safe to show; ``results()`` runs it to the
    end (if not yet) and returns ``[[Generation] * n] * len(prompts)``.
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
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.stepper, self.cfg, self.tokenizer = stepper, cfg, tokenizer
        self.end_ids, self.pad_id = set(end_ids), pad_id
        self.prompts = [list(p) for p in prompts]
        n = cfg.n
        self.rows = [
            _Row(i, j, len(p), IncrementalDetokenizer(tokenizer)) for i, p in enumerate(self.prompts) for j in range(n)
        ]
        base = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generators = [
            torch.Generator().manual_seed(derive_seed(base, prompt_offset + r.prompt_index, r.candidate))
            for r in self.rows
        ]
        self._max_stop = max((len(s) for s in cfg.stop), default=0)
        self._events: Iterator[tuple[int, str]] | None = None
        # grammar-constrained decoding: one matcher per row (ragloop.models.grammar), None = free text
        self.matchers = grammar_matchers(cfg, len(self.rows), tokenizer)

    # -- per-row bookkeeping ------------------------------------------------------------------------------

    def _append_text(self, row: _Row, piece: str) -> bool:
        """Add decoded text; cut at a stop string if one completed. True when the row stopped."""
        if not piece:
            return False
        old = len(row.text)
        row.text += piece
        if not self.cfg.stop:
            return False
        i = find_stop(row.text, self.cfg.stop, max(0, old - self._max_stop + 1))
        if i == -1:
            return False
        row.text = row.text[:i]
        keep = 0
        for k, end in enumerate(row.ends):
            if end == -1:
                continue
            if end > i:
                break
            keep = k + 1
        del row.ids[keep:], row.logprobs[keep:], row.scaled[keep:], row.ends[keep:]
        row.finish = "stop"
        return True

    def _accept(self, row: _Row, tok: int, lp: float | None, slp: float | None) -> None:
        """Take one generated token into ``row``: text, stop strings, end token, length limit."""
        row.ids.append(tok)
        if lp is not None:
            row.logprobs.append(lp)
            row.scaled.append(slp if slp is not None else lp)
        row.ends.append(-1)  # set below once the token's text is known
        if tok in self.end_ids:
            # the end token adds no text; bytes still pending before it are flushed as they are
            if not self._append_text(row, row.detok.flush()):
                row.ends[-1] = len(row.text)
                row.finish = "eos"
            return
        if self._append_text(row, row.detok.push(tok)):
            return
        row.ends[-1] = -1 if row.detok.pending else len(row.text)
        if len(row.ids) >= self.cfg.max_new_tokens and not self._append_text(row, row.detok.flush()):
            row.ends[-1] = len(row.text)
            row.finish = "length"

    def _emit(self, r: int, row: _Row) -> str:
        safe = len(row.text) if row.finish else len(row.text) - stop_holdback(row.text, self.cfg.stop)
        if safe <= row.emitted:
            return ""
        piece = row.text[row.emitted : safe]
        row.emitted = safe
        return piece

    # -- the loop -----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, str]]:
        # one underlying generator: a consumer that stops early and later calls results() resumes it
        if self._events is None:
            self._events = self._run()
        return self._events

    def _run(self) -> Iterator[tuple[int, str]]:
        cfg = self.cfg
        rows = self.rows
        expanded = [self.prompts[r.prompt_index] for r in rows]
        ids, mask = left_pad(expanded, self.pad_id)  # (R, T)
        logits = self.stepper.prefill(ids, mask)  # (R, V)
        seen = None
        if cfg.repetition_penalty != 1.0:
            counts = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)  # (R, V)
            counts.scatter_add_(1, ids.clamp(max=logits.shape[-1] - 1).to(logits.device), mask.to(logits.device))
            seen = counts > 0  # (R, V) tokens present in the prompt (pads excluded)
        scale_t = cfg.temperature if cfg.do_sample and cfg.temperature > 0 else 1.0
        for t in range(cfg.max_new_tokens):
            raw, logits = logits, mask_logits(logits, self.matchers)  # (R, V) -inf outside each row's grammar
            if cfg.do_sample:
                proc = sampling.process_logits(
                    logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    repetition_penalty=cfg.repetition_penalty, seen=seen,
                )  # (R, V)
                nxt = sampling.sample(proc, self.generators)  # (R,)
            else:
                proc = logits if seen is None else sampling.apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
                nxt = sampling.greedy(proc)  # (R,)
            lps = scaled = None
            if cfg.logprobs:
                # logprobs: the raw model's; scaled: under what was sampled from (temperature and grammar mask)
                lps = sampling.token_logprobs(raw, nxt).tolist()
                scaled = lps if scale_t == 1.0 and logits is raw else \
                    sampling.token_logprobs(logits, nxt, temperature=scale_t).tolist()
            toks = nxt.tolist()
            for r, row in enumerate(rows):
                if row.finish is not None:
                    continue
                self._accept(row, toks[r], lps[r] if lps else None, scaled[r] if scaled else None)
                if self.matchers is not None and row.finish is None:
                    self.matchers[r].accept(toks[r])
                    if self.matchers[r].is_done() and not self._append_text(row, row.detok.flush()):
                        row.ends[-1] = len(row.text)
                        row.finish = "stop"  # the grammar is complete
                piece = self._emit(r, row)
                if piece:
                    yield r, piece
            if all(row.finish is not None for row in rows) or t == cfg.max_new_tokens - 1:
                break
            if seen is not None:
                seen.scatter_(1, nxt.unsqueeze(-1), True)
            feed = torch.tensor([tok if row.finish is None else self.pad_id for tok, row in zip(toks, rows, strict=True)])
            logits = self.stepper.step(feed)  # (R, V)

    def results(self) -> list[list[Generation]]:
        """Run to the end (resuming a partly consumed iteration) and return the generations per prompt."""
        for _ in self:
            pass
        out: list[list[Generation]] = [[] for _ in self.prompts]
        for row in self.rows:
            out[row.prompt_index].append(
                Generation(
                    text=row.text,
                    token_ids=list(row.ids),
                    finish_reason=row.finish or "length",
                    logprobs=list(row.logprobs) if self.cfg.logprobs else None,
                    prompt_tokens=row.prompt_tokens,
                    scaled_logprobs=list(row.scaled) if self.cfg.logprobs else None,
                )
            )
        return out
