"""Attention kernels of the fast decode path (``ragloop.models.fast``), as small functions on tensors.

- ``prefill_bias``: the additive causal + left-padding mask of a prompt batch;
- ``decode_attention``: one new query per row against that row's KV cache, grouped-query attention
  (Ainslie et al. 2023) done as two batched matmuls over the KV heads;
- ``shared_prefix_decode_attention``: the same when ``n`` consecutive rows continue one prompt (``n``
  samples of a prompt, as in self-consistency): the prompt's keys and values are stored once, and its
  ``n`` rows' queries are stacked against them in one matmul; the prompt part and each row's own
  generated part are merged with the running-max softmax identity used by FlashAttention / flash-decoding
  (Dao et al. 2022): ``softmax([a, b]) @ [Va; Vb] = (e^(ma-m)·Pa·Va + e^(mb-m)·Pb·Vb) / (e^(ma-m)·la +
  e^(mb-m)·lb)`` with ``m = max(ma, mb)``, ``P = exp(s - max)`` and ``l`` its row sums. It saves the prefill
  of ``n - 1`` copies of the prompt and ``n - 1`` reads of its cache per token;
- ``repeated_rows``: how many consecutive identical rows a left-padded batch is made of.

Shapes: B rows, H query heads, KV key/value heads (G = H / KV query heads share one), hd head size,
S cached positions.
"""

from __future__ import annotations

import torch


def prefill_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """Additive mask (B, 1, T, T) for left-padded prompts: 0 where a query may attend, -inf elsewhere.

    A query attends to real keys at or before it. A padding query attends to itself only, so that no row
    of the softmax is all -inf (which would produce NaN in the padding's hidden states and its cache slots).

    >>> prefill_bias(torch.tensor([[0, 1, 1]]))[0, 0]
    tensor([[0., -inf, -inf],
            [-inf, 0., -inf],
            [-inf, 0., 0.]])
    """
    am = attention_mask.to(torch.bool)  # (B, T)
    T = am.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    allowed = (causal[None] & am[:, None, :]) | torch.eye(T, dtype=torch.bool)[None]  # (B, T, T)
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))[:, None]


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B, H, hd), k/v (B, KV, S, hd), bias (B, 1, 1, S) additive → (B, 1, H*hd).

    For one query per row, two batched matmuls over the B*KV groups of G query heads are faster on a CPU at
    batch 16 than ``scaled_dot_product_attention``'s flash kernel, which is tiled for long query blocks.
    """
    B, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.reshape(B * KV, H // KV, hd)  # (B*KV, G, hd)
    b = bias.expand(B, KV, 1, S).reshape(B * KV, 1, S)  # (B*KV, 1, S)
    att = torch.baddbmm(b, qg, k.reshape(B * KV, S, hd).transpose(1, 2), alpha=scale)  # (B*KV, G, S)
    att = torch.softmax(att, dim=-1)
    return torch.bmm(att, v.reshape(B * KV, S, hd)).reshape(B, 1, H * hd)  # (B, 1, H*hd)


def shared_prefix_decode_attention(
    q: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    bias_p: torch.Tensor,
    kg: torch.Tensor,
    vg: torch.Tensor,
    scale: float,
    bias_g: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row over a shared prompt cache and the row's own cache.

    q (B, H, hd) with B = U*n rows, row ``r`` continuing prompt ``r // n``; kp/vp (U, KV, T, hd) the
    prompts' cache; bias_p (U, T) additive (-inf at left padding); kg/vg (B, KV, L, hd) the row's own
    cache (its generated tokens, or a prompt suffix and its generated tokens); bias_g (B, L) additive, -inf
    at the own cache's padding (None: all valid; every row needs one valid own slot). Returns
    (B, 1, H*hd), equal to attention over ``[prompt, own]``.
    """
    B, H, hd = q.shape
    U, KV, T = kp.shape[0], kp.shape[1], kp.shape[2]
    n, G, L = B // U, H // KV, kg.shape[2]

    def to_rows(t: torch.Tensor) -> torch.Tensor:  # (U*KV, n*G, X) → (B*KV, G, X)
        return t.view(U, KV, n, G, t.shape[-1]).transpose(1, 2).reshape(B * KV, G, t.shape[-1])

    # prompt part: the n rows of a prompt stack their queries against its keys
    qp = q.view(U, n, KV, G, hd).transpose(1, 2).reshape(U * KV, n * G, hd)  # (U*KV, nG, hd)
    b = bias_p[:, None, None, :].expand(U, KV, 1, T).reshape(U * KV, 1, T)
    sp = torch.baddbmm(b, qp, kp.reshape(U * KV, T, hd).transpose(1, 2), alpha=scale)  # (U*KV, nG, T)
    mp = sp.amax(dim=-1, keepdim=True)  # (U*KV, nG, 1)
    pp = sp.sub_(mp).exp_()
    lp = pp.sum(dim=-1, keepdim=True)
    yp = torch.bmm(pp, vp.reshape(U * KV, T, hd))  # (U*KV, nG, hd)
    mp, lp, yp = to_rows(mp), to_rows(lp), to_rows(yp)  # (B*KV, G, ·)

    # generated part: each row's own keys
    sg = torch.bmm(q.reshape(B * KV, G, hd), kg.reshape(B * KV, L, hd).transpose(1, 2)).mul_(scale)  # (B*KV, G, L)
    if bias_g is not None:
        sg.add_(bias_g[:, None, None, :].expand(B, KV, 1, L).reshape(B * KV, 1, L))
    mg = sg.amax(dim=-1, keepdim=True)
    pg = sg.sub_(mg).exp_()
    lg = pg.sum(dim=-1, keepdim=True)
    yg = torch.bmm(pg, vg.reshape(B * KV, L, hd))  # (B*KV, G, hd)

    m = torch.maximum(mp, mg)
    ap, ag = torch.exp(mp - m), torch.exp(mg - m)  # (B*KV, G, 1)
    y = (yp * ap + yg * ag) / (lp * ap + lg * ag)  # (B*KV, G, hd)
    return y.reshape(B, 1, H * hd)


def repeated_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """The largest ``n`` such that the batch is blocks of ``n`` consecutive identical rows (1 if none).

    >>> repeated_rows(torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]]), torch.ones(4, 2))
    2
    >>> repeated_rows(torch.tensor([[1, 2], [1, 2], [3, 4]]), torch.ones(3, 2))
    1
    """
    B = input_ids.shape[0]
    if B < 2:
        return 1
    same = (input_ids[1:] == input_ids[:-1]).all(-1) & (attention_mask[1:] == attention_mask[:-1]).all(-1)  # (B-1,)
    first_break = (~same).nonzero()
    n = int(first_break[0, 0]) + 1 if len(first_break) else B
    if n == 1 or B % n:
        return 1
    inside = (torch.arange(1, B) % n) != 0  # (B-1,) pairs within one block (across blocks: either)
    return n if bool(same[inside].all()) else 1
