"""Agents: ReAct, PAL, chain of thought (+ self-consistency) on a Policy, with typed per-agent tools.

Public API::

    from ragloop.agents import ReActAgent, PALAgent, CoTAgent
    trace = ReActAgent(policy, retriever=Retriever.open("mydocs")).run("What is nucleus sampling?")
    trace = PALAgent(policy).run("A store sells pens at 3 for $2. How much do 18 pens cost?")
    trace = CoTAgent(policy, CoTConfig(shots=4, self_consistency=8)).run("...")

Every run returns a ``ragloop.core.trace.Trace``. The code sandbox lives in ``ragloop.agents.sandbox``.
Submodules are imported on first use so ``import ragloop.agents`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ReActAgent": "ragloop.agents.react",
    "ReActConfig": "ragloop.agents.react",
    "PALAgent": "ragloop.agents.pal",
    "PALConfig": "ragloop.agents.pal",
    "CoTAgent": "ragloop.agents.cot",
    "CoTConfig": "ragloop.agents.cot",
    "AgentEvent": "ragloop.agents.base",
    "Tool": "ragloop.agents.tools",
    "ToolResult": "ragloop.agents.tools",
    "ToolRegistry": "ragloop.agents.tools",
    "tool_from_function": "ragloop.agents.tools",
    "calculator_tool": "ragloop.agents.tools",
    "python_tool": "ragloop.agents.tools",
    "finish_tool": "ragloop.agents.tools",
    "KeywordBackend": "ragloop.agents.docsearch",
    "RetrieverBackend": "ragloop.agents.docsearch",
    "document_tools": "ragloop.agents.docsearch",
    "build_agent": "ragloop.agents.factory",
    "AgentSpec": "ragloop.agents.factory",
    "RAGAgent": "ragloop.agents.rag",
    "RAGConfig": "ragloop.agents.rag",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ragloop.agents' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


__all__ = list(_LAZY)
