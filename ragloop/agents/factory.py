"""Building an agent from a few settings: what the CLI, the REPL and the benchmark runners share.

``AgentSpec`` names the agent (``react`` | ``pal`` | ``cot``), the task family (``qa`` over an index,
``math``, ``claims``) and the knobs a user changes (shots, self-consistency, decoding, budgets);
``build_agent`` turns it into a configured agent with the right exemplars, tools and fallback:

- ``react`` + ``qa``: Search/Lookup over the index, the paper's HotpotQA trajectories, fallback CoT-SC on
  the paper's HotpotQA CoT exemplars;
- ``react`` + ``math``: Calculator (and Python if asked), trajectories made from the GSM8K CoT exemplars,
  fallback 8-shot CoT-SC;
- ``react`` + ``claims``: Search/Lookup, the paper's FEVER trajectories, fallback CoT-SC on its FEVER CoT
  exemplars;
- ``pal`` / ``cot``: the GSM8K prompts of the papers;
- ``rag`` + ``qa`` or ``claims``: retrieve the top passages once, answer from them with citations
  (``ragloop.agents.rag``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ragloop.agents.base import AgentBase, EventHandler
from ragloop.agents.cot import FEVER_FORMAT, GSM8K_FORMAT, QA_FORMAT, CoTAgent, CoTConfig
from ragloop.agents.pal import PALAgent, PALConfig
from ragloop.agents.prompts import (
    load_fever_cot_exemplars,
    load_fever_exemplars,
    load_hotpot_cot_exemplars,
    react_math_exemplars,
)
from ragloop.agents.react import ReActAgent, ReActConfig, react_tools_for
from ragloop.core.errors import UsageError
from ragloop.models.types import GenerationConfig, Policy

AGENT_KINDS = ("react", "pal", "cot", "rag")
TASKS = ("qa", "math", "claims")


@dataclass
class AgentSpec:
    """What to build. ``temperature=None`` (or 0) means greedy decoding."""

    kind: Literal["react", "pal", "cot", "rag"] = "react"
    task: Literal["qa", "math", "claims"] = "qa"
    shots: int | None = None  # None: the agent's default
    self_consistency: int = 1
    tools: tuple[str, ...] = ()  # extra built-in tools for ReAct: calculator, python
    prompt_style: str | None = None  # None: the agent's default
    action_format: Literal["text", "json"] = "text"
    max_new_tokens: int | None = None
    max_steps: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    fallback: Literal["cot-sc", "none"] = "cot-sc"
    fallback_samples: int = 5
    embedder: Any = None  # choose exemplars by similarity
    extra: dict[str, Any] = field(default_factory=dict)
    constrained: bool = False  # grammar-constrained actions/programs/answers (ragloop.models.grammar)

    def __post_init__(self) -> None:
        if self.kind not in AGENT_KINDS:
            raise UsageError(f"unknown agent {self.kind!r}", hint=f"choose one of: {', '.join(AGENT_KINDS)}")
        if self.task not in TASKS:
            raise UsageError(f"unknown task {self.task!r}", hint=f"choose one of: {', '.join(TASKS)}")
        if self.shots is not None and self.shots < 0:
            raise UsageError(f"--shots must be >= 0, got {self.shots}")
        if self.self_consistency < 1:
            raise UsageError(f"--self-consistency must be >= 1, got {self.self_consistency}")

    def decoding(self, max_new_tokens: int) -> GenerationConfig:
        if not self.temperature:
            return GenerationConfig(max_new_tokens=max_new_tokens, greedy=True, temperature=0.0, seed=self.seed)
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, seed=self.seed)


def _opt(value: Any, default: Any) -> Any:
    return default if value is None else value


def build_agent(
    policy: Policy,
    spec: AgentSpec,
    *,
    retriever: Any = None,
    search_backend: Any = None,
    sandbox: Any = None,
    on_event: EventHandler | None = None,
) -> AgentBase:
    """A configured agent for ``spec`` (see the module docstring)."""
    if spec.kind == "rag":
        from ragloop.agents.rag import RAGAgent, RAGConfig

        if spec.task == "math":
            raise UsageError("the rag agent answers from documents, not math", hint="use --agent pal or cot")
        mnt = _opt(spec.max_new_tokens, 160)
        rag_cfg = RAGConfig(k=int(spec.extra.get("k", 3)), task=spec.task, max_new_tokens=mnt, seed=spec.seed,  # type: ignore[arg-type]
                            decoding=spec.decoding(mnt))
        return RAGAgent(policy, retriever, rag_cfg, on_event=on_event)
    if spec.kind == "pal":
        mnt = _opt(spec.max_new_tokens, 256)
        cfg = PALConfig(shots=_opt(spec.shots, 8), self_consistency=spec.self_consistency,
                        prompt_style=_opt(spec.prompt_style, "raw"), max_new_tokens=mnt, seed=spec.seed,
                        temperature=spec.temperature or 0.7, embedder=spec.embedder,
                        decoding=spec.decoding(mnt), constrained=spec.constrained)
        return PALAgent(policy, cfg, sandbox=sandbox, on_event=on_event)
    if spec.kind == "cot":
        mnt = _opt(spec.max_new_tokens, 256)
        fmt, pool = GSM8K_FORMAT, None
        if spec.task == "claims":
            fmt, pool = FEVER_FORMAT, load_fever_cot_exemplars()
        elif spec.task == "qa":
            fmt, pool = QA_FORMAT, load_hotpot_cot_exemplars()
        cfg = CoTConfig(shots=_opt(spec.shots, 8 if spec.task == "math" else len(pool or [])), exemplars=pool,
                        format=fmt, self_consistency=spec.self_consistency,
                        prompt_style=_opt(spec.prompt_style, "raw"), max_new_tokens=mnt, seed=spec.seed,
                        temperature=spec.temperature or 0.7, embedder=spec.embedder, decoding=spec.decoding(mnt),
                        constrained=spec.constrained)
        return CoTAgent(policy, cfg, on_event=on_event)

    # ReAct
    mnt = _opt(spec.max_new_tokens, 128)
    tools = list(react_tools_for(*spec.tools, sandbox=sandbox)) if spec.tools else []
    fallback_fmt, fallback_pool, fallback_shots = QA_FORMAT, load_hotpot_cot_exemplars(), 6
    exemplars = None
    prefix = "Question"
    if spec.task == "math":
        if not any(t.name == "Calculator" for t in tools):
            tools = [*react_tools_for("calculator"), *tools]
        exemplars = react_math_exemplars()
        fallback_fmt, fallback_pool, fallback_shots = GSM8K_FORMAT, None, 8
    elif spec.task == "claims":
        exemplars = load_fever_exemplars()
        prefix = "Claim"
        fallback_fmt, fallback_pool, fallback_shots = FEVER_FORMAT, load_fever_cot_exemplars(), 3
    if spec.task in ("qa", "claims") and retriever is None and search_backend is None:
        raise UsageError("the ReAct agent needs an index to search", hint="pass --index PATH_OR_NAME")
    default_shots = {"qa": 2, "math": 4, "claims": 3}[spec.task]
    cfg = ReActConfig(
        shots=_opt(spec.shots, default_shots), exemplars=exemplars, task_prefix=prefix,
        action_format=spec.action_format, prompt_style=_opt(spec.prompt_style, "chat"),  # type: ignore[arg-type]
        max_new_tokens=mnt, max_steps=_opt(spec.max_steps, 6), seed=spec.seed, fallback=spec.fallback,
        fallback_samples=spec.fallback_samples, embedder=spec.embedder, decoding=spec.decoding(mnt),
        constrained=spec.constrained,
        finish_labels=["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"] if spec.task == "claims" else None,
    )
    fallback = None
    if spec.fallback == "cot-sc":
        fallback = CoTAgent(policy, CoTConfig(
            shots=fallback_shots, exemplars=fallback_pool, format=fallback_fmt,
            self_consistency=spec.fallback_samples, seed=spec.seed, max_new_tokens=_opt(spec.max_new_tokens, 256),
            prompt_style="raw", constrained=spec.constrained,
        ))
    return ReActAgent(policy, tools, retriever=retriever, search_backend=search_backend, config=cfg,
                      fallback_agent=fallback, on_event=on_event)
