"""Tiny random-weight models over the real SmolLM2 tokenizer (a Llama; a T5 encoder-decoder), for fast tests of
decoding and training.

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

__all__ = ["build_tiny_llama", "build_tiny_t5"]


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


def build_tiny_t5(
    tokenizer: Any,
    *,
    layers: int = 2,
    d_model: int = 64,
    heads: int = 4,
    d_ff: int | None = None,
    n_positions: int = 512,
    init_factor: float = 2.0,
    seed: int = 0,
) -> Any:
    """A ``T5ForConditionalGeneration`` (encoder-decoder) with random weights from ``seed`` over ``tokenizer``.

    ``layers`` each in the encoder and the decoder; ``init_factor`` scales T5's initialiser (1.0 in a real
    model) for the same reason ``init_std`` is large above: clear preferences rather than near-ties. The
    decoder starts from the pad token (T5's convention) and stops at the tokenizer's EOS (for the SmolLM2
    tokenizer, ``<|im_end|>``-style ids are stop tokens as well). The global torch RNG is left as it was.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must divide by heads ({heads})")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff or 2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        n_positions=n_positions,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=pad_id,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        initializer_factor=init_factor,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    model.eval()
    return model
