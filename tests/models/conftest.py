"""Fixtures for the model tests: the real SmolLM2 tokenizer, a tiny random Llama over it, policies on both."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    from ragloop.models.loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer):
    from ragloop.models.tiny import build_tiny_llama

    return build_tiny_llama(smol_tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_policy(tiny_model, smol_tokenizer):
    """The tiny model behind the reference (transformers) decode path."""
    from ragloop.models.local import LocalPolicy

    return LocalPolicy.from_model(tiny_model, smol_tokenizer, name="tiny", backend="hf")


@pytest.fixture
def fresh_tiny_policy(smol_tokenizer):
    """A tiny policy with its own weights (for tests that change them); ``backend`` as asked."""
    from ragloop.models.local import LocalPolicy
    from ragloop.models.tiny import build_tiny_llama

    def make(backend: str = "hf", **kw):
        model = build_tiny_llama(smol_tokenizer, **kw)
        return LocalPolicy.from_model(model, smol_tokenizer, name="tiny", backend=backend)

    return make
