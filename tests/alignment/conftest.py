"""Shared fixtures for the alignment tests: the real SmolLM2 tokenizer and a tiny random Llama over it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    from ragloop.models.loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def chat_render(smol_tokenizer):
    """The shared chat renderer (the one LocalPolicy.render uses), bound to the real tokenizer."""
    from ragloop.models.chat import render_messages

    def render(messages, add_generation_prompt=True):
        return render_messages(smol_tokenizer, messages, add_generation_prompt=add_generation_prompt)

    return render


@pytest.fixture
def tiny_model_factory(smol_tokenizer):
    """Build a fresh 2-layer random Llama over the real tokenizer (same seed → same weights)."""
    from ragloop.models.tiny import build_tiny_llama

    def make(seed: int = 0, **kw):
        return build_tiny_llama(smol_tokenizer, layers=2, hidden=32, heads=4, kv_heads=2, seed=seed, **kw)

    return make
