"""ragloop: local-first agentic RAG and tool use, with an alignment loop on the agents' own traces.

The public Python API is re-exported here; heavy submodules are imported lazily on first attribute access
so that ``import ragloop`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from ragloop.core import (
    ContextWindowError,
    Message,
    RagloopError,
    Step,
    ToolCall,
    Trace,
    UsageError,
    read_traces,
    write_traces,
)
from ragloop.models.types import Generation, GenerationConfig, Policy

__version__ = "0.1.0"

# name -> module that defines it (imported on first use)
_LAZY = {
    "load_policy": "ragloop.models",
    "LocalPolicy": "ragloop.models",
    "ScriptedPolicy": "ragloop.models",
    "Retriever": "ragloop.retrieval",
    "ReActAgent": "ragloop.agents",
    "PALAgent": "ragloop.agents",
    "CoTAgent": "ragloop.agents",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ragloop' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


__all__ = [
    "ContextWindowError", "Generation", "GenerationConfig", "Message", "Policy", "RagloopError", "Step",
    "ToolCall", "Trace", "UsageError", "__version__", "read_traces", "write_traces", *_LAZY,
]
