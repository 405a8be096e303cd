"""A tiny random-weight Llama over the real SmolLM2 tokenizer, for fast tests of decoding and training.

The model has the real vocabulary (so prompts, chat templates, stop strings and detokenization are the
real thing) but only a few small layers, so a forward pass costs microseconds and a training step a few
milliseconds. Its weights are random — it babbles — which is what unit tests of decoding logic and of
training mechanics (loss finite, parameters change, same seed → same loss) want; behaviour tests use the
real embedded model.

Example::

    >>> tok = load_tokenizer()                       # ragloop.models.loading
    >>> model = build_tiny_llama(tok, layers=2, hidden=64)
    >>> policy = LocalPolicy.from_model(model, tok, name="tiny")
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["build_tiny_llama"]


def build_tiny_llama(
    tokenizer: Any,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 2048,
    init_std: float = 0.2,
    seed: int = 0,
) -> Any:
    """A ``LlamaForCausalLM`` with random weights drawn from ``seed`` over ``tokenizer``'s vocabulary.

    ``init_std`` is larger than a real model's initialiser (0.02) on purpose: with 0.02 a tiny model's
    next-token distribution is almost uniform, so greedy decoding would hinge on near-ties and tests of
    "batched == unbatched" would test float noise rather than logic. The global torch RNG is left as it was.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=init_std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model
