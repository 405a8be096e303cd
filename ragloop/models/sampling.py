"""Pure functions on next-token logits: temperature, top-k, top-p, repetition penalty, greedy and sampling.

Every function takes a ``(B, V)`` float tensor of logits (one row per sequence) and returns a new tensor;
filtered-out tokens get ``-inf``. The order ``process_logits`` applies them is the usual one (and HF's):
repetition penalty → temperature → top-k → top-p.

- temperature: ``logits / T`` (Ackley et al. 1985; T → 0 approaches arg-max);
- top-k: keep exactly the ``k`` largest logits (Fan et al. 2018) — ties broken by index, so always k;
- top-p / nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
  mass reaches ``p`` (always at least one token);
- repetition penalty (Keskar et al. 2019, CTRL): a token already present in the sequence has its logit
  divided by ``penalty`` when positive and multiplied when negative.

Sampling uses the inverse CDF with one uniform draw per row from that row's own ``torch.Generator``, so a
row's tokens depend only on its own seed and logits — not on which other rows share the batch.

Example::

    >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    tensor([[-inf, 3., 2.]])
    >>> top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7)   # 0.5 < 0.7 ≤ 0.5 + 0.3
    tensor([[-0.6931, -1.2040,    -inf]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; temperature must be > 0 (0 means greedy — handled by the caller)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature  # (B, V)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of each row (``k <= 0`` or ``k >= V``: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    idx = torch.topk(logits, k, dim=-1).indices  # (B, k)
    out = torch.full_like(logits, NEG_INF)
    return out.scatter(-1, idx, logits.gather(-1, idx))  # (B, V)


def top_p_filter(logits: torch.Tensor, p: float, *, first_k: int = 64) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (``p >= 1``: unchanged).

    A token is kept when the mass of the tokens strictly more likely than it is still below ``p``; the most
    likely token always is (mass before it is 0). Sorting the whole vocabulary is slow on a CPU (~5 ms per
    49k-token row), and the nucleus is usually small, so the candidates are the ``first_k`` most likely
    tokens, widened 4× at a time until their mass reaches ``p`` in every row (the same set a full sort gives).
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    vocab = probs.shape[-1]
    k = min(first_k, vocab)
    while True:
        top, idx = torch.topk(probs, k, dim=-1)  # (B, k) sorted, most likely first
        if k == vocab or bool((top.sum(dim=-1) >= p).all()):
            break
        k = min(vocab, 4 * k)
    mass_before = torch.cumsum(top, dim=-1) - top  # (B, k)
    keep_top = mass_before < p
    keep_top[..., 0] = True
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, keep_top)  # (B, V)
    return logits.masked_fill(~keep, NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty on the tokens marked in ``seen`` (a ``(B, V)`` bool mask)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return torch.where(seen, penalised, logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The arg-max token of each row: ``(B, V) -> (B,)``."""
    return torch.argmax(logits, dim=-1)


def sample(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row from ``softmax(logits)`` by inverse-CDF sampling: ``(B, V) -> (B,)``.

    Row ``b`` draws one uniform number from ``generators[b]``; ``-inf`` logits have probability 0 and are
    never chosen.
    """
    if len(generators) != logits.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} for {logits.shape[0]} rows")
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    cdf = torch.cumsum(probs, dim=-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdf.device, cdf.dtype)  # (B,)
    u = u * cdf[:, -1]  # scale into the row's total mass (≈ 1 up to rounding)
    idx = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)  # (B,)
    idx = idx.clamp(max=logits.shape[-1] - 1)
    # The first index whose cdf exceeds u always has probability > 0; only a u that rounds up to the total
    # mass falls off the end (clamped above) and may hit a zero-probability token: take the arg-max then.
    bad = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, greedy(logits), idx)
    return idx


def process_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampling distribution's logits: repetition penalty → temperature → top-k → top-p."""
    out = logits.float()  # (B, V)
    if repetition_penalty != 1.0 and seen is not None:
        out = apply_repetition_penalty(out, seen, repetition_penalty)
    out = apply_temperature(out, temperature)
    if 0 < top_k < out.shape[-1]:
        return _top_k_then_top_p(out, top_k, top_p)
    return top_p_filter(out, top_p)


def _top_k_then_top_p(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """``top_p_filter(top_k_filter(logits, k), p)`` with one ``topk`` call (the nucleus is found among the
    k survivors, whose softmax is the renormalised top-k distribution)."""
    vals, idx = torch.topk(logits, k, dim=-1)  # (B, k) sorted, largest first
    if p < 1.0:
        probs = torch.softmax(vals, dim=-1)  # (B, k)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= p
        drop[..., 0] = False
        vals = vals.masked_fill(drop, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter(-1, idx, vals)  # (B, V)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens``: ``(B, V), (B,) -> (B,)``."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
