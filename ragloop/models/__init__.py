"""The policy model: loading (embedded default, HF directory, GGUF), chat rendering, decoding, scoring.

``load_policy(spec)`` returns a ``LocalPolicy`` (the ``Policy`` protocol of ``types``), or a ``Seq2SeqPolicy``
for an encoder-decoder directory (``seq2seq``); ``ScriptedPolicy`` is a deterministic stand-in for tests;
``build_tiny_llama`` / ``build_tiny_t5`` tiny random models for fast tests; ``tokenizer`` the tokenizer front door.
Heavy modules (torch, transformers) are imported on first use so ``import ragloop.models`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from ragloop.models.types import (
    ChatMessages,
    Generation,
    GenerationConfig,
    GrammarSpec,
    Policy,
    Prompt,
    as_messages,
)

_LAZY = {
    "load_policy": "ragloop.models.loading",
    "load_tokenizer": "ragloop.models.loading",
    "load_model_and_tokenizer": "ragloop.models.loading",
    "resolve_spec": "ragloop.models.loading",
    "write_model_dir": "ragloop.models.loading",
    "LocalPolicy": "ragloop.models.local",
    "ScriptedPolicy": "ragloop.models.scripted",
    "build_tiny_llama": "ragloop.models.tiny",
    "Stepper": "ragloop.models.decoding",
    "HFStepper": "ragloop.models.decoding",
    "sequence_logprobs": "ragloop.models.decoding",
    "PolicyChatModel": "ragloop.models.langchain_chat",
    "Seq2SeqPolicy": "ragloop.models.seq2seq",
    "model_family": "ragloop.models.seq2seq",
    "span_corrupt": "ragloop.models.seq2seq",
    "build_tiny_t5": "ragloop.models.tiny",
    "IncrementalDetokenizer": "ragloop.models.tokenizer",
    "round_trip": "ragloop.models.tokenizer",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ragloop.models' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


__all__ = ["ChatMessages", "Generation", "GenerationConfig", "GrammarSpec", "Policy", "Prompt", "as_messages", *_LAZY]
