"""A fast CPU decode path for Llama-family models: prepacked weights, a static KV cache, few ops per token.

``make_stepper(model)`` reads the weights of a Hugging Face ``LlamaForCausalLM`` once and returns a
``FastStepper`` with two calls the decode loop (``ragloop.models.decoding``) drives:

- ``prefill(input_ids, attention_mask)``: LEFT-padded prompts ``(B, T)`` → logits ``(B, V)`` of the last
  position; resets the KV cache and fills it;
- ``step(next_ids)``: the ``(B,)`` tokens just chosen → logits ``(B, V)`` of the next position.

Why it is faster than ``model.generate`` at batch 1 on a CPU: one decode step reads every weight once from
DRAM, so it is bound by memory bandwidth, and the plain ``F.linear`` (MKL sgemm/gemv) path reaches only a
fraction of it. What this module does about it (each lever measured in ``benchmarks/bench_decode.py`` and
recorded in ``benchmarks/RESULTS.md``):

- weights are fused (Q|K|V into one matrix, gate|up into one) and prepacked once into oneDNN's blocked
  layout (``torch.ops.mkldnn._reorder_linear_weight``), whose matmul streams them faster than MKL's
  gemv on the plain layout;
- ``precision="bf16"`` stores matmul weights in bfloat16 (half the bytes; AVX-512 BF16 dot products), and
  ``precision="int8"`` stores them as int8 with one absmax scale per output channel (weight-only
  round-to-nearest quantisation, the vector-wise scheme of Dettmers et al. 2022 applied to weights only)
  — a quarter of the bytes; ``precision="int4"`` stores them as 4-bit with a (scale, min) pair per group
  of 32 inputs — GGML's Q4_1 layout, so for the embedded model (a Q4_1 GGUF) the weights are exact and
  only bf16 rounding of scales and activations remains — an eighth of the bytes, used for decode steps
  of up to 4 rows (prefill and larger batches use a bf16 copy, where that kernel is faster; the output
  projection is bf16 there, and 4-bit with its top 64 logits recomputed in fp32 for steps of ≤ 4 rows). Norms, RoPE, attention, softmax and the residual stream stay fp32 in every mode;
- each precision's kernel is chosen from what the CPU has (``ragloop.models.cpu.matmul_kernel``): oneDNN's
  bf16 path needs AVX-512 (bw/vl/dq) or AVX-NE-CONVERT, so on AVX2 and ARM bf16 weights (and int4's bf16
  copy) run on ``_Bf16FallbackLinear``, correct on every CPU;
- a preallocated KV cache (no ``torch.cat`` per token, doubled when full) and one additive padding mask;
- ``n`` candidates of one prompt (rows ``i*n .. i*n+n-1``, as ``DecodeRun`` lays them out) share one
  prefill and one prompt cache (``fast_attention.shared_prefix_decode_attention``): ``n``× less prefill
  and ``n``× fewer prompt-cache reads per token, which matters for long prompts (PAL, few-shot CoT);
- the per-token Python is a short loop of tensor ops (no module hooks, no cache objects).

The model is the one of Touvron et al. 2023 (LLaMA): RMSNorm (Zhang & Sennrich 2019), rotary position
embeddings (Su et al. 2021), grouped-query attention (Ainslie et al. 2023), a SiLU-gated MLP (Shazeer 2020).
``precision="fp32"`` computes the same function as the HF model: logits equal up to float rounding (~1e-5),
so greedy tokens are the same unless two logits tie to that precision. Reduced precisions trade a little
next-token agreement for speed (measured in the benchmark). The fast path is for inference only: it holds a
packed copy of the weights, so after the model's weights change a new stepper must be built.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ragloop.core.errors import ContextWindowError, UsageError
from ragloop.models.cpu import CpuInfo, detect_cpu, matmul_kernel
from ragloop.models.fast_attention import (
    decode_attention,
    prefill_bias,
    repeated_rows,
    shared_prefix_decode_attention,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # inputs per (scale, min) pair, as in GGML's Q4_1


# ----------------------------------------------------------------------------------------------------------
# Linear layers in three precisions; which kernel runs them is decided by ragloop.models.cpu


def _mkldnn_ok() -> bool:
    return bool(torch.backends.mkldnn.is_available())


class _PackedLinear:
    """``y = x @ W.T`` with ``W`` (N, K) prepacked for oneDNN (fp32 or bf16 weights).

    The output keeps the weights' dtype: a bf16 output added to the fp32 residual stream promotes to fp32
    in the add itself, so no separate cast is spent on it. oneDNN's bf16 prepack raises on CPUs without
    avx512bw/vl/dq or avx_ne_convert: ``ragloop.models.cpu.matmul_kernel`` routes those to
    ``_Bf16FallbackLinear`` first, and ``_bf16_linear`` catches a refusal the flags did not predict.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, batch_hint: int) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        w = weight.detach().to(dtype).contiguous()  # (N, K)
        self.packed = _mkldnn_ok()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint) if self.packed else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")  # (..., N)
        else:
            y = F.linear(x, self.weight)
        return y


class _Bf16FallbackLinear:
    """bf16 weights where oneDNN has no bf16 path (AVX2, ARM, plain x86-64): correct on every CPU.

    Two kernels, chosen per call by the number of rows, because neither wins everywhere (measured on the
    real model's matmul shapes with AVX2 kernels, ``bench_cpu.py --mode kernels``; RESULTS.md, "Decoding on
    every CPU"): torch's own bf16 GEMV (``F.linear`` on bf16) streams half the bytes of fp32 and is the
    fastest kernel for 1-2 rows (2.3× fp32 prepacked at one row), but its bf16 GEMM falls to a slow path
    from ~4 rows (2-3× slower than fp32 at 16 rows); above
    ``gemv_rows`` the bf16 weights are widened to fp32 per call and multiplied by MKL's sgemm, which costs
    about what fp32 prepacked weights cost and keeps the memory at bf16's half. Outputs: bf16 on the GEMV
    path (promoted to fp32 in the residual add, as ``_PackedLinear``'s), fp32 above.
    """

    def __init__(self, weight: torch.Tensor, gemv_rows: int = 2) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach().to(torch.bfloat16).contiguous()  # (N, K)
        self.gemv_rows = gemv_rows
        self.large: _PackedLinear | None = None

    def keep_fp32_copy(self) -> None:
        """Hold an fp32 prepacked copy of the (bf16-rounded) weights for calls above ``gemv_rows``: for the
        output head (49152 x 576 in SmolLM2) widening per call costs more than the matmul itself."""
        self.large = _PackedLinear(self.weight.float(), torch.float32, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.gemv_rows * self.in_features:
            return F.linear(x.to(torch.bfloat16), self.weight)  # (..., N) bf16
        if self.large is not None:
            return self.large(x.float())  # (..., N) fp32
        return F.linear(x.float(), self.weight.float())  # (..., N) fp32


def _bf16_linear(weight: torch.Tensor, kernel: str, batch_hint: int):
    """bf16 weights on ``kernel`` ("onednn_bf16" or "bf16_fallback"); a oneDNN refusal falls back."""
    if kernel == "onednn_bf16":
        try:
            return _PackedLinear(weight, torch.bfloat16, batch_hint)
        except RuntimeError as e:  # e.g. "mkldnn_reorder_linear_weight: bf16 path needs the cpu support ..."
            log.warning("oneDNN bf16 matmul unavailable on this CPU (%s); using the bf16 fallback kernel",
                        str(e).splitlines()[0][:160])
    return _Bf16FallbackLinear(weight)


class _Int8Linear:
    """Weight-only int8: ``W ≈ Q * s`` with ``Q`` int8 (N, K) and one fp scale per output row (absmax/127).

    The int8 kernel (``torch._weight_int8pack_mm``) is fast only with bf16 activations on CPU (with fp32
    ones it takes a slow reference path, ~20× slower), so the input is cast to bf16; the output is bf16.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_int8_per_channel(weight.detach().float())
        self.q = q  # (N, K) int8
        self.scale = scale.to(torch.bfloat16)  # (N,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (M, K)
        y = torch._weight_int8pack_mm(x2, self.q, self.scale)  # (M, N) bf16
        return y.reshape(*shape[:-1], self.out_features)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ≈ q * scale[:, None]``.

    >>> q, s = quantize_int8_per_channel(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    >>> q.tolist(), [round(v, 6) for v in s.tolist()]
    ([[64, -127], [127, 64]], [0.015748, 0.003937])
    """
    amax = weight.abs().amax(dim=1).clamp_min(1e-12)  # (N,)
    scale = amax / 127.0
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


class _Int4Linear:
    """Weight-only 4-bit, group-wise asymmetric: ``W ≈ Q * scale + min`` per group of 32 inputs.

    This is GGML's Q4_1 layout, so the weights of a model read from a Q4_1 GGUF file (the embedded
    SmolLM2) are recovered exactly from their dequantised fp32 values; only the bf16 rounding of the scales
    and of the activations remains. The kernel (``torch._weight_int4pack_mm_for_cpu``) computes
    ``(Q - 8) * scale + zero``, hence ``zero = min + 8 * scale``; it needs N % 16 == 0 and K % 32 == 0.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = N, K = weight.shape
        if N % 16 or K % INT4_GROUP:
            raise UsageError(
                f"precision='int4' needs matmul shapes with N % 16 == 0 and K % {INT4_GROUP} == 0, got {N}x{K}",
                hint="use precision='bf16' for this model",
            )
        w = weight.detach().float()
        q, scale, minimum = quantize_int4_groupwise(w, INT4_GROUP)
        # weights already on a 4-bit grid (a Q4_1 GGUF's) come back exactly; others are rounded (lossy)
        recon = q.view(N, K // INT4_GROUP, INT4_GROUP) * scale[..., None] + minimum[..., None]
        self.on_grid = bool(((recon - w.view_as(recon)).abs() <= 1e-3 * scale[..., None]).all())
        self.q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # packed uint8
        zero = minimum + 8 * scale
        self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()  # (K/g, N, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (M, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.q, INT4_GROUP, self.scales_zeros)  # (M, N) bf16
        return y.reshape(*shape[:-1], self.out_features)


class _SmallBatchInt4Linear:
    """4-bit weights for calls of at most ``max_rows`` rows (decode steps of one or a few sequences), bf16
    weights for larger ones (prefill, big batches): the 4-bit kernel reads an eighth of the fp32 bytes but
    computes slower, so past ~6 rows the bf16 kernel wins (measured: ``bench_decode.py --levers``). The bf16
    copy runs on the same kernel as ``precision="bf16"`` (``large_kernel``, from ``cpu.matmul_kernel``)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int, max_rows: int = 4,
                 large_kernel: str = "onednn_bf16") -> None:
        self.small = _Int4Linear(weight)
        self.large = _bf16_linear(weight, large_kernel, batch_hint)
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x) if x.numel() <= self.max_rows * self.in_features else self.large(x)


class _RescoredInt4Head:
    """The output projection for ``precision="int4"``: 4-bit logits, the best ``top_k`` of them recomputed exactly.

    The head is the largest matrix of a small model (SmolLM2-135M: 49152 x 576, tied to the embedding, Q8_0
    in the GGUF file llama.cpp runs), so at one or a few rows it costs as much as all 30 layers in 4 bits:
    bf16 reads 57 MB per token (~6 ms on one core), the 4-bit kernel 16 MB (~2 ms). 4-bit logits alone move
    by up to a few units, which could change the argmax, so the ``top_k`` candidates per row are rescored
    with the fp32 weights (a (k, D) gather and a dot product, ~0.1 ms): greedy decoding picks the token the
    fp32 head picks unless that token is outside the 4-bit top ``top_k`` (the int4 logits are off by a few
    units at most, far less than the gap to the 64th candidate), and sampling sees exact logits wherever its
    mass is. Tail logits keep their 4-bit values, capped at the smallest rescored one, so the argmax is always
    an exact logit. Calls of more than ``max_rows`` rows (prefill, batches)
    use the bf16 head (``large``), where the matmul is compute-bound and the 4-bit kernel is slower.
    """

    def __init__(self, weight: torch.Tensor, large, *, top_k: int = 64, max_rows: int = 4) -> None:
        self.small = _Int4Linear(weight)
        self.large = large
        self.weight = weight.detach().float()  # (V, D): the model's own tensor when it is fp32 (not copied)
        self.out_features, self.in_features = weight.shape
        self.top_k = min(int(top_k), self.out_features)
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.max_rows * self.in_features:
            return self.large(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, D)
        logits = self.small(x2).float()  # (M, V) 4-bit estimates
        idx = logits.topk(self.top_k, dim=-1).indices  # (M, k)
        exact = torch.einsum("md,mkd->mk", x2, self.weight[idx])  # (M, k) fp32
        # a tail estimate may not outrank a rescored candidate: the argmax is always an exact logit
        logits = torch.minimum(logits, exact.min(dim=-1, keepdim=True).values).scatter_(1, idx, exact)
        return logits.reshape(*shape[:-1], self.out_features)


def weights_on_int4_grid(model: torch.nn.Module, layers: tuple[int, ...] = (0, -1)) -> bool:
    """Whether the matmul weights of ``layers`` of a Llama model lie on a Q4_1 grid (4-bit, groups of 32), so
    that ``precision="int4"`` reproduces them exactly (the embedded GGUF model); False for weights int4 would
    round (random, fine-tuned, HF fp16/bf16 checkpoints) and for shapes the int4 kernel cannot take. Two
    layers are checked, not all: a checkpoint is quantised, or fine-tuned, as a whole."""
    try:
        blocks = model.model.layers
    except AttributeError:
        return False
    for i in layers:
        if not -len(blocks) <= i < len(blocks):
            return False
        block = blocks[i]
        for lin in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.down_proj):
            w = lin.weight.detach().float()  # (N, K)
            N, K = w.shape
            if N % 16 or K % INT4_GROUP:
                return False
            q, scale, low = quantize_int4_groupwise(w, INT4_GROUP)
            recon = q.view(N, K // INT4_GROUP, INT4_GROUP) * scale[..., None] + low[..., None]
            if not bool(((recon - w.view_as(recon)).abs() <= 1e-3 * scale[..., None]).all()):
                return False
    return True


def quantize_int4_groupwise(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit with one (scale, min) per ``group`` inputs: ``w ≈ q * scale + min``, q in 0..15.

    Returns q (N, K) int32, scale and min (N, K / group).

    >>> q, scale, low = quantize_int4_groupwise(torch.tensor([[0.5, 1.0, 2.0, 8.0]]), 4)
    >>> q.tolist(), scale.tolist(), low.tolist()
    ([[0, 1, 3, 15]], [[0.5]], [[0.5]])
    """
    N, K = weight.shape
    wg = weight.reshape(N, K // group, group)  # (N, K/g, g)
    low = wg.amin(dim=-1)  # (N, K/g)
    scale = ((wg.amax(dim=-1) - low) / 15).clamp_min(1e-12)
    q = torch.round((wg - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(N, K)
    return q, scale, low


def _make_linear(weight: torch.Tensor, precision: str, batch_hint: int, kernels: dict[str, str] | None = None):
    """The linear layer for ``precision`` on ``kernels`` (``cpu.matmul_kernel(precision)``; this CPU's if None)."""
    kernels = kernels or matmul_kernel(precision)
    if precision == "int8":
        return _Int8Linear(weight)
    if precision == "int4":
        return _SmallBatchInt4Linear(weight, batch_hint, large_kernel=kernels["large"])
    if precision == "bf16":
        return _bf16_linear(weight, kernels["small"], batch_hint)
    return _PackedLinear(weight, torch.float32, batch_hint)


# ----------------------------------------------------------------------------------------------------------
# Architecture and weights


@dataclass(frozen=True)
class LlamaShape:
    """The sizes a Llama decode step needs (read from the HF config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    max_positions: int


@dataclass
class _Layer:
    ln1: torch.Tensor  # (D,)
    qkv: object  # linear D -> (H + 2 KV) * hd
    o: object  # linear H * hd -> D
    ln2: torch.Tensor  # (D,)
    gate_up: object  # linear D -> 2 I
    down: object  # linear I -> D


def check_supported(model: torch.nn.Module) -> LlamaShape:
    """Raise UsageError unless ``model`` is a Llama-family causal LM this module computes exactly."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        raise UsageError(
            f"the fast decode path supports Llama-family models only, got "
            f"{getattr(cfg, 'model_type', type(model).__name__)!r}",
            hint="use the HF backend (backend='hf') for this model",
        )
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(model, "lm_head"):
        raise UsageError("the fast decode path needs a LlamaForCausalLM (model.model.layers, lm_head)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UsageError(f"the fast decode path supports hidden_act='silu' only, got {cfg.hidden_act!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UsageError("the fast decode path does not support attention/MLP biases")
    rope = getattr(inner, "rotary_emb", None)
    rope_type = getattr(rope, "rope_type", None)
    # RoPE variants whose inverse frequencies are fixed at load time (dynamic/longrope change with length)
    if rope is None or not hasattr(rope, "inv_freq") or rope_type not in ("default", "linear", "llama3", "yarn"):
        raise UsageError(f"the fast decode path does not support rope_type={rope_type!r}")
    if next(model.parameters()).device.type != "cpu":
        raise UsageError("the fast decode path runs on CPU only")
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    return LlamaShape(
        num_layers=len(layers),
        hidden_size=cfg.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=model.lm_head.weight.shape[0],
        rms_eps=float(cfg.rms_norm_eps),
        max_positions=int(getattr(cfg, "max_position_embeddings", 2048)),
    )


def _extract_layers(model: torch.nn.Module, precision: str, batch_hint: int,
                    kernels: dict[str, str] | None = None) -> list[_Layer]:
    out = []
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        wqkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], dim=0)  # ((H+2KV)hd, D)
        wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # (2I, D)
        out.append(
            _Layer(
                ln1=layer.input_layernorm.weight.detach().float().clone(),
                qkv=_make_linear(wqkv, precision, batch_hint, kernels),
                o=_make_linear(att.o_proj.weight, precision, batch_hint, kernels),
                ln2=layer.post_attention_layernorm.weight.detach().float().clone(),
                gate_up=_make_linear(wgu, precision, batch_hint, kernels),
                down=_make_linear(mlp.down_proj.weight, precision, batch_hint, kernels),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# The stepper


class FastStepper:
    """Prefill + one-token steps over a preallocated KV cache. Not thread-safe; one decode at a time.

    When a prefill's rows come in blocks of ``n`` identical prompts (``n`` candidates per prompt, the
    layout of ``DecodeRun``) and ``share_prompts`` is on, each prompt is run and cached once and its rows
    attend to it through ``shared_prefix_decode_attention``; otherwise every row has its own cache.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        precision: str = "fp32",
        max_batch: int = 16,
        max_seq_len: int | None = None,
        reserve: int = 256,
        share_prompts: bool = True,
        cpu: CpuInfo | None = None,
        rescored_head: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise UsageError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.shape = s = check_supported(model)
        self.precision = precision
        self.max_batch = max_batch
        self.max_seq_len = int(max_seq_len or s.max_positions)
        self.reserve = max(1, int(reserve))  # cache slots allocated beyond the prompt; doubled when full
        self.share_prompts = share_prompts
        self.cpu = cpu or detect_cpu()
        self.kernels = matmul_kernel(precision, self.cpu)  # {"small": ..., "large": ...} kernel names
        with torch.no_grad():
            self.embed = model.model.embed_tokens.weight.detach().float()  # (V, D), shared, not copied
            self.layers = _extract_layers(model, precision, 1, self.kernels)
            self.norm = model.model.norm.weight.detach().float().clone()  # (D,)
            # int4: the output projection is the (tied) embedding, 8-bit in GGUF files — bf16 for big calls,
            # 4-bit with the top candidates rescored in fp32 for decode steps
            head_precision = "bf16" if precision == "int4" else precision
            self.lm_head = _make_linear(model.lm_head.weight, head_precision, 1, matmul_kernel(head_precision, self.cpu))
            if isinstance(self.lm_head, _Bf16FallbackLinear):
                self.lm_head.keep_fp32_copy()  # batched steps: the head's per-call widening dominated them
            V, D = model.lm_head.weight.shape
            if precision == "int4" and rescored_head and V % 16 == 0 and D % INT4_GROUP == 0:
                # decode steps of a few rows: 4-bit head + exact top-k (see _RescoredInt4Head)
                self.lm_head = _RescoredInt4Head(model.lm_head.weight, self.lm_head)
            if precision == "int4":
                # True for the embedded model (Q4_1 GGUF); otherwise int4 rounds the weights (check quality)
                self.int4_exact = all(lin.small.on_grid for layer in self.layers
                                      for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
                log.info("int4 weights %s", "are exact (on a 4-bit grid)" if self.int4_exact else "are rounded")
            rope = model.model.rotary_emb
            self.inv_freq = rope.inv_freq.detach().float().clone()  # (hd/2,)
            self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self.scale = 1.0 / math.sqrt(s.head_dim)
        self._cos = self._sin = None  # (P, hd) tables, grown on demand
        self._k: list[torch.Tensor] = []  # per layer (B, KV, S, hd): prompt + generated, or generated only
        self._v: list[torch.Tensor] = []
        self._bias: torch.Tensor | None = None  # (B, S) additive: 0 valid, -inf padding (unshared only)
        self._kp: list[torch.Tensor] = []  # per layer (U, KV, T, hd): the U distinct prompts (shared only)
        self._vp: list[torch.Tensor] = []
        self._bias_p: torch.Tensor | None = None  # (U, T)
        self._n = 1  # rows per distinct prompt (1: no sharing)
        self._prompt_len = 0  # T
        self._prefix: list[int] = []  # prefix mode: the token ids every row's prompt starts with (in _kp/_vp)
        # the last prefix's cache, kept across batches (reset() does not drop it): a later batch whose prompts
        # start with the same tokens (an agent's exemplars) skips their prefill. Valid for these weights only —
        # the policy builds a new stepper when its weights change.
        self._store: tuple[tuple[int, ...], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._pos: torch.Tensor | None = None  # (B,) position of the next token
        self._len = 0  # slots of self._k filled
        self._batch = 0
        self.prefix_hits = 0  # prefill_prefix calls served from the kept prefix cache

    # -- tables and cache ---------------------------------------------------------------------------------

    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, (n, hd): rotate_half(x) * sin == roll(x, hd/2) * sin_signed."""
        if self._cos is None or self._cos.shape[0] < n:
            cap = max(n, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            pos = torch.arange(cap, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]  # (cap, hd/2), as HF: position * inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)  # (cap, hd)
            half = self.inv_freq.shape[0]
            sign = torch.cat([-torch.ones(half), torch.ones(half)])  # (hd,)
            self._cos = emb.cos() * self.rope_scale
            self._sin = emb.sin() * self.rope_scale * sign
        return self._cos, self._sin

    def _zeros(self, rows: int, slots: int) -> list[torch.Tensor]:
        s = self.shape
        return [torch.zeros(rows, s.num_kv_heads, slots, s.head_dim) for _ in range(s.num_layers)]

    def _grow(self) -> None:
        """Make room for one more token in ``self._k``/``self._v`` (doubling), within max_seq_len."""
        cap, need = self._k[0].shape[2], self._len + 1
        if need <= cap:
            return
        before = self._prompt_len if self._n > 1 else len(self._prefix)  # prompt slots held outside self._k
        if before + need > self.max_seq_len:
            raise ContextWindowError(
                f"the sequence reached {before + need} tokens, more than max_seq_len={self.max_seq_len}",
                hint="ask for fewer new tokens or use a shorter prompt",
            )
        new_cap = min(max(need, 2 * cap), self.max_seq_len - before)
        old_k, old_v = self._k, self._v
        self._k, self._v = self._zeros(self._batch, new_cap), self._zeros(self._batch, new_cap)
        for dst, src in zip(self._k + self._v, old_k + old_v, strict=True):
            dst[:, :, :cap].copy_(src)
        if self._bias is not None:
            self._bias = torch.cat([self._bias, self._bias.new_zeros(self._batch, new_cap - cap)], dim=1)

    # -- forward ------------------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """ids (B, T) at positions pos (B, T) → logits (B, V) of the last position.

        ``attend(i, q, k, v)`` does layer ``i``'s cache write and attention: q (B, T, H, hd) and k
        (B, T, KV, hd) after RoPE, v (B, T, KV, hd) → (B, T, H*hd).
        """
        s = self.shape
        B, T = ids.shape
        H, KV, hd, D = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size
        cos_t, sin_t = self._rope_tables(int(pos.max()) + 1)
        cos = cos_t[pos].unsqueeze(2)  # (B, T, 1, hd)
        sin = sin_t[pos].unsqueeze(2)  # (B, T, 1, hd), sign folded in
        x = self.embed[ids]  # (B, T, D) fp32 residual stream
        eps = s.rms_eps
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (D,), layer.ln1, eps)  # (B, T, D)
            qkv = layer.qkv(h).view(B, T, H + 2 * KV, hd)  # (B, T, H+2KV, hd)
            qk = qkv[:, :, : H + KV].float()  # (B, T, H+KV, hd)
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)  # RoPE on q and k at once
            y = attend(i, qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :])  # (B, T, H*hd)
            x = x + layer.o(y)
            h = F.rms_norm(x, (D,), layer.ln2, eps)
            g, u = layer.gate_up(h).chunk(2, dim=-1)  # (B, T, I) each
            x = x + layer.down(F.silu(g) * u)
        h = F.rms_norm(x[:, -1], (D,), self.norm, eps)  # (B, D)
        return self.lm_head(h).float()  # (B, V)

    def _prefill_attend(self, kcache: list[torch.Tensor], vcache: list[torch.Tensor], bias: torch.Tensor):
        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            B, T = q.shape[:2]
            kc, vc = kcache[i], vcache[i]
            kc[:, :, :T] = k.transpose(1, 2)  # (B, KV, T, hd)
            vc[:, :, :T] = v.transpose(1, 2)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), kc[:, :, :T], vc[:, :, :T], attn_mask=bias, enable_gqa=True
            )  # (B, H, T, hd)
            return y.transpose(1, 2).reshape(B, T, -1)

        return attend

    def _prefix_prefill_attend(self, kcache: list[torch.Tensor], vcache: list[torch.Tensor], bias: torch.Tensor):
        """Prefill of prompt suffixes after the shared prefix (``_kp``/``_vp``, all rows): each suffix query
        attends to the whole prefix and, causally, to its own suffix (``bias`` (B, 1, T, T) from prefill_bias)."""
        P = len(self._prefix)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            B, T = q.shape[:2]
            kc, vc = kcache[i], vcache[i]
            kc[:, :, :T] = k.transpose(1, 2)  # (B, KV, T, hd)
            vc[:, :, :T] = v.transpose(1, 2)
            kp, vp = self._kp[i].expand(B, -1, -1, -1), self._vp[i].expand(B, -1, -1, -1)  # (B, KV, P, hd)
            keys = torch.cat([kp, kc[:, :, :T]], dim=2)  # (B, KV, P+T, hd)
            vals = torch.cat([vp, vc[:, :, :T]], dim=2)
            mask = torch.cat([bias.new_zeros(B, 1, T, P), bias], dim=-1)  # (B, 1, T, P+T)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask, enable_gqa=True)
            return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)

        return attend

    def _step_attend(self):
        slot, end = self._len, self._len + 1
        if self._prefix:
            bias_p, bias_g = self._bias_p, self._bias[:, :end]

            def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                kc, vc = self._k[i], self._v[i]
                kc[:, :, slot:end] = k.transpose(1, 2)  # (B, KV, 1, hd)
                vc[:, :, slot:end] = v.transpose(1, 2)
                return shared_prefix_decode_attention(
                    q[:, 0], self._kp[i], self._vp[i], bias_p, kc[:, :, :end], vc[:, :, :end], self.scale, bias_g
                )

            return attend
        if self._n > 1:
            bias_p = self._bias_p

            def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                kc, vc = self._k[i], self._v[i]
                kc[:, :, slot:end] = k.transpose(1, 2)  # (B, KV, 1, hd)
                vc[:, :, slot:end] = v.transpose(1, 2)
                return shared_prefix_decode_attention(
                    q[:, 0], self._kp[i], self._vp[i], bias_p, kc[:, :, :end], vc[:, :, :end], self.scale
                )

            return attend
        bias = self._bias[:, None, None, :end]  # (B, 1, 1, S)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = self._k[i], self._v[i]
            kc[:, :, slot:end] = k.transpose(1, 2)
            vc[:, :, slot:end] = v.transpose(1, 2)
            return decode_attention(q[:, 0], kc[:, :, :end], vc[:, :, :end], bias, self.scale)

        return attend

    def reset(self) -> None:
        """Free the KV cache (it is kept after a decode until the next prefill or this call)."""
        self._k, self._v, self._kp, self._vp = [], [], [], []
        self._bias = self._bias_p = self._pos = None
        self._len = self._batch = 0
        self._prefix = []

    # -- the two calls of the Stepper protocol --------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor) -> torch.Tensor:
        """LEFT-padded prompts (B, T) → logits (B, V) at the last position; resets and fills the cache."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise UsageError(
                f"prefill needs input_ids and attention_mask of the same (B, T) shape, got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        B, T = input_ids.shape
        if B < 1 or T < 1:
            raise UsageError("prefill needs at least one prompt of at least one token")
        if B > self.max_batch:
            raise UsageError(f"batch {B} exceeds max_batch={self.max_batch}", hint="split the batch")
        if T > self.max_seq_len:
            raise ContextWindowError(f"the prompt has {T} tokens, more than max_seq_len={self.max_seq_len}")
        am = attention_mask.to(torch.bool)
        if not bool(am[:, -1].all()):
            raise UsageError("prompts must be LEFT-padded: the last position of every row must be a token")
        n = repeated_rows(input_ids, attention_mask) if self.share_prompts else 1
        ids, am = (input_ids[::n], am[::n]) if n > 1 else (input_ids, am)  # (R, T), R = B / n distinct rows
        R = ids.shape[0]
        pos = (am.long().cumsum(-1) - 1).clamp_min(0)  # (R, T) as model.generate: real tokens count from 0
        bias = torch.zeros(R, T).masked_fill_(~am, float("-inf"))  # (R, T)
        self.reset()  # release the previous decode's cache before allocating this one
        self._batch, self._n, self._prompt_len = B, n, T
        if n > 1:
            self._kp, self._vp = self._zeros(R, T), self._zeros(R, T)
            self._bias_p = bias
            attend = self._prefill_attend(self._kp, self._vp, prefill_bias(am))
            logits = self._forward(ids, pos, attend).repeat_interleave(n, dim=0)  # (B, V)
            cap = min(self.reserve, self.max_seq_len - T)
            self._k, self._v = self._zeros(B, cap), self._zeros(B, cap)
            self._len = 0
        else:
            cap = min(self.max_seq_len, T + self.reserve)
            self._k, self._v = self._zeros(B, cap), self._zeros(B, cap)
            self._bias = torch.cat([bias, bias.new_zeros(B, cap - T)], dim=1)  # (B, cap)
            logits = self._forward(ids, pos, self._prefill_attend(self._k, self._v, prefill_bias(am)))
            self._len = T
        self._pos = (pos[:, -1] + 1).repeat_interleave(n)  # (B,)
        return logits

    @torch.inference_mode()
    def step(self, next_ids: torch.LongTensor) -> torch.Tensor:
        """The (B,) tokens just chosen → logits (B, V) for the next position."""
        if self._pos is None:
            raise UsageError("step() called before prefill()")
        if next_ids.shape != (self._batch,):
            raise UsageError(f"step needs ({self._batch},) token ids, got {tuple(next_ids.shape)}")
        self._grow()
        logits = self._forward(next_ids[:, None], self._pos[:, None], self._step_attend())
        self._len += 1
        self._pos = self._pos + 1
        return logits

    # -- continuous batching (ragloop.models.engine) --------------------------------------------------------

    @torch.inference_mode()
    def prefill_prefix(
        self, prefix_ids: list[int], input_ids: torch.LongTensor, attention_mask: torch.LongTensor
    ) -> torch.Tensor:
        """Start a batch whose prompts all begin with ``prefix_ids`` (P tokens, e.g. a few-shot block); the
        (B, T) LEFT-padded ``input_ids`` are the rest of each prompt. Returns logits (B, V) at the last position.

        The prefix is run and cached once (``_kp``/``_vp``, one row) and every row attends to it through
        ``shared_prefix_decode_attention``, so B prompts sharing 900 tokens cost one 900-token prefill plus
        their suffixes, and each decode step reads the prefix's cache once per KV head group instead of B
        times. Rows may join (``regroup``) with suffixes of the same prefix. Same function as prefilling the
        whole prompts: every key has its real position, padding sits between prefix and suffix, masked.
        """
        B, T = input_ids.shape
        P = len(prefix_ids)
        if P < 1 or B < 1 or T < 1:
            raise UsageError("prefill_prefix needs a non-empty prefix and at least one suffix token per row")
        if B > self.max_batch:
            raise UsageError(f"batch {B} exceeds max_batch={self.max_batch}", hint="split the batch")
        if P + T > self.max_seq_len:
            raise ContextWindowError(f"the prompt has {P + T} tokens, more than max_seq_len={self.max_seq_len}")
        am = attention_mask.to(torch.bool)
        if not bool(am[:, -1].all()):
            raise UsageError("suffixes must be LEFT-padded: the last position of every row must be a token")
        self.reset()
        key = tuple(int(t) for t in prefix_ids)
        if self._store is not None and self._store[0] == key:  # cached by an earlier batch: no prefill
            self._kp, self._vp = self._store[1], self._store[2]
            self.prefix_hits += 1
        else:
            ones = torch.ones(1, P, dtype=torch.bool)
            self._kp, self._vp = self._zeros(1, P), self._zeros(1, P)
            self._forward(torch.tensor([prefix_ids]), torch.arange(P)[None],
                          self._prefill_attend(self._kp, self._vp, prefill_bias(ones)))
            self._store = (key, self._kp, self._vp)  # read-only from here on (steps write only _k/_v)
        self._bias_p = torch.zeros(1, P)
        self._prefix = list(prefix_ids)
        pos = P + (am.long().cumsum(-1) - 1).clamp_min(0)  # (B, T): suffix tokens continue the prefix
        cap = min(self.max_seq_len - P, T + self.reserve)
        self._k, self._v = self._zeros(B, cap), self._zeros(B, cap)
        bias = torch.zeros(B, T).masked_fill_(~am, float("-inf"))
        self._bias = torch.cat([bias, bias.new_zeros(B, cap - T)], dim=1)  # (B, cap)
        logits = self._forward(input_ids, pos, self._prefix_prefill_attend(self._k, self._v, prefill_bias(am)))
        self._batch, self._n, self._prompt_len, self._len = B, 1, T, T
        self._pos = pos[:, -1] + 1  # (B,)
        return logits

    @property
    def prefix(self) -> list[int]:
        """The shared prefix of the running batch ([] when there is none)."""
        return self._prefix

    @property
    def stored_prefix(self) -> list[int]:
        """The prefix whose cache is kept for later batches (``prefill_prefix`` with it skips its prefill)."""
        return list(self._store[0]) if self._store is not None else []

    def can_regroup(self) -> bool:
        """True when rows can be dropped and added mid-decode (a running batch without a shared prompt cache)."""
        return self._pos is not None and self._n == 1

    @torch.inference_mode()
    def regroup(self, keep: torch.LongTensor, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.LongTensor | None = None) -> torch.Tensor:
        """Keep rows ``keep`` (in that order) of the running batch and append new LEFT-padded prompts (N, T).

        Returns the new rows' logits (N, V) (``(0, V)`` without new rows: a compaction); the kept rows continue
        where they were. Caches stay right-aligned: every row's newest slot is the last filled one, and the
        slots before a row's start are masked by ``-inf`` in the additive bias, so rows of different lengths
        share one cache. The merged cache holds only the slots some row still uses (``max(span, T)``, span =
        the longest kept row), so it shrinks when long rows leave. RoPE was applied when a key was written,
        so moving a key to another slot does not change it. One copy of the kept cache per call: the engine
        calls this when rows join or many finished, not every token.
        """
        if not self.can_regroup():
            raise UsageError("regroup needs a running batch without a shared prompt cache")
        K = int(keep.numel())
        V = self.embed.shape[0]
        if input_ids is None:
            input_ids = torch.zeros(0, 1, dtype=torch.long)
            attention_mask = torch.ones(0, 1, dtype=torch.long)
        N, T = input_ids.shape
        if K + N > self.max_batch:
            raise UsageError(f"batch {K + N} exceeds max_batch={self.max_batch}", hint="split the batch")
        if K + N == 0:
            raise UsageError("regroup needs at least one row to keep or add")
        am = attention_mask.to(torch.bool)
        if N and not bool(am[:, -1].all()):
            raise UsageError("prompts must be LEFT-padded: the last position of every row must be a token")
        old = self._len
        span = 0  # slots the kept rows use: from the earliest kept row's first real slot to the end
        if K:
            used = self._bias.index_select(0, keep)[:, :old] == 0  # (K, old)
            first = torch.where(used.any(1), used.float().argmax(1), torch.full((K,), old))  # (K,)
            span = old - int(first.min())
        L = max(span, T if N else 0, 1)
        P = len(self._prefix)
        if P + L + 1 > self.max_seq_len:
            raise ContextWindowError(f"the prompt has {T} tokens, more than max_seq_len={self.max_seq_len}")
        logits = torch.zeros(0, V)
        if N:
            # the new rows on their own: a prefill into their own (N, KV, T, hd) cache (after the shared prefix
            # in prefix mode: then input_ids are the prompts' suffixes)
            pos = P + (am.long().cumsum(-1) - 1).clamp_min(0)  # (N, T)
            bias_new = torch.zeros(N, T).masked_fill_(~am, float("-inf"))  # (N, T)
            kn, vn = self._zeros(N, T), self._zeros(N, T)
            make_attend = self._prefix_prefill_attend if P else self._prefill_attend
            logits = self._forward(input_ids, pos, make_attend(kn, vn, prefill_bias(am)))  # (N, V)
        # merged cache: kept rows' slots [old - span, old) → [L - span, L); new rows' [0, T) → [L - T, L)
        cap = min(self.max_seq_len - P, L + self.reserve)
        B = K + N
        k_all, v_all = self._zeros(B, cap), self._zeros(B, cap)
        for j, (dst, src_old) in enumerate(zip(k_all + v_all, self._k + self._v, strict=True)):
            if K and span:
                dst[:K, :, L - span : L] = src_old.index_select(0, keep)[:, :, old - span : old]
            if N:
                dst[K:, :, L - T : L] = (kn + vn)[j]
        bias = torch.zeros(B, cap)
        bias[:, :L] = float("-inf")
        if K and span:
            bias[:K, L - span : L] = self._bias.index_select(0, keep)[:, old - span : old]
        if N:
            bias[K:, L - T : L] = bias_new
        self._k, self._v, self._bias = k_all, v_all, bias
        new_pos = [self._pos.index_select(0, keep)] + ([pos[:, -1] + 1] if N else [])
        self._pos = torch.cat(new_pos)  # (B,)
        self._len, self._batch = L, B
        return logits

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one row holds (all layers, keys and values, fp32)."""
        s = self.shape
        return s.num_layers * 2 * s.num_kv_heads * s.head_dim * 4


def make_stepper(
    model: torch.nn.Module,
    *,
    precision: str = "fp32",
    max_batch: int = 16,
    max_seq_len: int | None = None,
    cpu: CpuInfo | None = None,
) -> FastStepper:
    """A ``FastStepper`` over ``model``'s weights (a ``ragloop.models.decoding.Stepper``).

    ``precision``: "fp32" (same function as the HF model), "bf16", "int8" or "int4" (matmul weights only;
    "int4" = 4-bit for decode steps of up to 4 rows, bf16 otherwise — see benchmarks/RESULTS.md).
    ``max_batch`` rows at most per prefill; ``max_seq_len`` tokens (prompt + generated) at most per row
    (default: the model's ``max_position_embeddings``). The KV cache is sized per prefill, so these are
    limits, not allocations. Raises ``UsageError`` (a ``RagloopError``) for a model or setting it does not
    support — the caller then falls back to the HF stepper. Building packs a copy of the matmul weights
    (fp32: the model's size again; bf16: half; int8: a quarter; int4: a bf16 copy plus an eighth).
    ``cpu``: the processor whose kernels to use (``ragloop.models.cpu.detect_cpu()``, the default, honours
    ``RAGLOOP_CPU_CAPABILITY``); bf16 runs on oneDNN where the CPU has its bf16 path, else on a fallback.
    """
    t = time.perf_counter()
    stepper = FastStepper(model, precision=precision, max_batch=max_batch, max_seq_len=max_seq_len, cpu=cpu)
    log.debug("fast stepper (%s, kernels %s) built in %.2f s", precision, stepper.kernels, time.perf_counter() - t)
    return stepper
