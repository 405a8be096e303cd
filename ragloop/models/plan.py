"""Compute planning: parameters, training memory by precision, sharding, and the Chinchilla token budget.

The figures are the standard back-of-the-envelope ones:

- Inference weights: N × bytes per parameter (fp32 4, bf16/fp16 2, int8 1).
- Full fine-tuning with Adam (Kingma & Ba 2015), *model states only* (activations come on top and depend on
  batch size and sequence length):
  - fp32: weights 4 + gradients 4 + Adam first and second moments 4 + 4 = **16 bytes/param**;
  - mixed precision, bf16 or fp16 (Micikevicius et al. 2018; the ZeRO paper's accounting, Rajbhandari et
    al. 2020): bf16 weights 2 + bf16 gradients 2 + an fp32 master copy of the weights 4 + fp32 Adam
    moments 8 = **16 bytes/param** — half precision speeds up the matmuls and halves activations, but the
    fp32 master weights and optimizer states keep the model-state memory at 16 bytes; fp16 also needs
    loss scaling, bf16 (fp32's exponent range) does not;
  - pure bf16 (weights, gradients and Adam moments all bf16, no master copy): 2 + 2 + 4 = 8 bytes/param,
    cheaper but updates smaller than bf16's resolution are lost.
- Sharding: FSDP full sharding / ZeRO stage 3 splits weights, gradients and optimizer states over G GPUs,
  so each holds 1/G of them. A model needs sharding when its model states exceed ``headroom`` (0.8) of
  one GPU's memory (the rest is for activations, buffers and the CUDA context); G = ⌈states / (headroom ×
  memory)⌉ is the fewest GPUs that hold them.
- Chinchilla (Hoffmann et al. 2022): compute-optimal training uses ≈ 20 tokens per parameter, and
  training costs ≈ 6·N·D FLOPs (2 for the forward pass, 4 for the backward; Kaplan et al. 2020).

Example::

    >>> chinchilla(1_000_000_000)
    {'tokens_per_param': 20, 'tokens': 20000000000, 'train_flops': 1.2e+20}
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from ragloop.core.errors import ModelNotFoundError, UsageError

GIB = 1024**3
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
# Model-state bytes per parameter for full fine-tuning with Adam (see the module docstring).
TRAIN_BYTES_PER_PARAM = {
    "fp32": {"weights": 4, "gradients": 4, "master_weights": 0, "adam_states": 8},
    "bf16_mixed": {"weights": 2, "gradients": 2, "master_weights": 4, "adam_states": 8},
    "fp16_mixed": {"weights": 2, "gradients": 2, "master_weights": 4, "adam_states": 8},
    "bf16_pure": {"weights": 2, "gradients": 2, "master_weights": 0, "adam_states": 4},
}
CHINCHILLA_TOKENS_PER_PARAM = 20
DEFAULT_HEADROOM = 0.8

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_size(text: str) -> int | None:
    """A parameter count written as a size: ``parse_size("7B") -> 7000000000``, ``"135M" -> 135000000``,
    ``"1.5b" -> 1500000000``; None when ``text`` is not a size."""
    m = _SIZE_RE.match(text)
    if not m:
        return None
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2).lower()]))


def params_from_config(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama-family decoder from its HF config (embeddings, grouped-query attention, gated
    MLP, RMSNorms, output head unless tied). SmolLM2-135M's config gives 134,515,008."""
    try:
        v, h = int(cfg["vocab_size"]), int(cfg["hidden_size"])
        layers, inter = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"config lacks a field needed to count parameters: {e}") from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    bias = bool(cfg.get("attention_bias", False))
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + (heads * hd + 2 * kv * hd + h if bias else 0)
    mlp = 3 * h * inter + (2 * inter + h if cfg.get("mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * h  # two RMSNorm weight vectors
    head = 0 if cfg.get("tie_word_embeddings", True) else v * h
    return v * h + layers * per_layer + h + head


def params_from_safetensors(path: Path) -> int:
    """Parameters stored in a safetensors file, read from its header only (no tensor data is loaded)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def params_from_gguf(path: Path) -> tuple[int, int | None]:
    """(parameters, context length) of a GGUF file from its tensor table and metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n = sum(int(math.prod(int(d) for d in t.shape)) for t in reader.tensors)
    ctx = None
    for key, field in reader.fields.items():
        if key.endswith(".context_length"):
            ctx = int(field.parts[field.data[0]][0])
    return n, ctx


def count_params_of(spec: str) -> dict[str, Any]:
    """``{"name", "params", "context_window", "source"}`` for a model spec (embedded default, HF dir, GGUF)."""
    from ragloop.models.loading import list_cached_models, resolve_spec

    src = resolve_spec(spec)  # counting never converts a model: it reads file headers
    if src.kind == "gguf":
        for entry in list_cached_models():
            if entry.get("ok") and entry.get("source") == str(src.path) and entry.get("params"):
                return {"name": src.name, "params": int(entry["params"]),
                        "context_window": entry.get("context_window"), "source": str(src.path)}
        n, ctx = params_from_gguf(src.path)
        return {"name": src.name, "params": n, "context_window": ctx, "source": str(src.path)}
    cfg = json.loads((src.path / "config.json").read_text(encoding="utf-8"))
    shards = sorted(src.path.glob("*.safetensors"))
    n = sum(params_from_safetensors(p) for p in shards) if shards else params_from_config(cfg)
    return {"name": src.name, "params": n, "context_window": cfg.get("max_position_embeddings"),
            "source": str(src.path)}


def inference_memory(n_params: int) -> dict[str, float]:
    """GiB of weights alone per storage precision."""
    return {k: n_params * b / GIB for k, b in BYTES_PER_PARAM.items()}


def training_memory(n_params: int) -> dict[str, dict[str, float]]:
    """GiB of model states for full fine-tuning with Adam, per precision regime and in total."""
    out: dict[str, dict[str, float]] = {}
    for regime, parts in TRAIN_BYTES_PER_PARAM.items():
        row = {k: n_params * b / GIB for k, b in parts.items()}
        row["total"] = sum(row.values())
        row["bytes_per_param"] = float(sum(parts.values()))
        out[regime] = row
    return out


def sharding(states_gib: float, gpu_memory_gib: float, headroom: float = DEFAULT_HEADROOM) -> dict[str, Any]:
    """Whether ``states_gib`` of model states need FSDP/ZeRO-3 sharding on GPUs of ``gpu_memory_gib``:
    ``sharding(32.0, 80.0) -> {'needs_sharding': False, 'min_gpus': 1, ...}``."""
    if gpu_memory_gib <= 0:
        raise UsageError(f"GPU memory must be > 0 GB, got {gpu_memory_gib}")
    usable = headroom * gpu_memory_gib
    gpus = max(1, math.ceil(states_gib / usable))
    return {"needs_sharding": gpus > 1, "min_gpus": gpus, "per_gpu_gib": states_gib / gpus,
            "usable_gib_per_gpu": usable}


def chinchilla(n_params: int) -> dict[str, Any]:
    """Compute-optimal tokens (≈ 20 per parameter) and the training FLOPs 6·N·D."""
    d = CHINCHILLA_TOKENS_PER_PARAM * n_params
    return {"tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM, "tokens": d, "train_flops": 6.0 * n_params * d}


def plan_for_params(n_params: int, gpu_memory_gb: float | None = None, *, name: str | None = None) -> dict[str, Any]:
    """The whole plan for a parameter count (pure)."""
    if n_params <= 0:
        raise UsageError(f"the parameter count must be positive, got {n_params}")
    train = training_memory(n_params)
    out: dict[str, Any] = {
        "name": name or human_count(n_params),
        "params": n_params,
        "inference_gib": inference_memory(n_params),
        "training_gib": train,
        "chinchilla": chinchilla(n_params),
        "notes": [
            "training memory is model states only (weights, gradients, Adam moments); activations come on top",
            "mixed precision keeps an fp32 master copy and fp32 Adam moments: 16 bytes/param, like fp32",
        ],
    }
    if gpu_memory_gb is not None:
        out["gpu_memory_gib"] = gpu_memory_gb
        out["sharding"] = {regime: sharding(row["total"], gpu_memory_gb) for regime, row in train.items()}
        out["inference_fits_one_gpu"] = {
            k: v <= DEFAULT_HEADROOM * gpu_memory_gb for k, v in out["inference_gib"].items()
        }
    return out


def plan(model_or_size: str, gpu_memory_gb: float | None = None) -> dict[str, Any]:
    """Plan for a model spec (``default``, an HF directory, a .gguf file) or a size such as ``"7B"``."""
    text = str(model_or_size).strip()
    if not text:
        raise UsageError("give a model (default, a directory, a .gguf file) or a size such as 7B")
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise UsageError(f"--gpu-memory must be > 0 GB, got {gpu_memory_gb}")
    n = parse_size(text)
    if n is not None:
        return plan_for_params(n, gpu_memory_gb, name=text)
    try:
        info = count_params_of(text)
    except ModelNotFoundError as e:
        e.hint = "give a size such as 135M or 7B, or " + (e.hint or "a model path")
        raise
    out = plan_for_params(info["params"], gpu_memory_gb, name=info["name"])
    out["context_window"] = info.get("context_window")
    out["source"] = info["source"]
    return out


def human_count(n: float) -> str:
    """``human_count(134515008) -> '134.5M'``."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(int(n))
