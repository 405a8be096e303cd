"""A LangChain chat model over any ragloop ``Policy`` (local, scripted, or a later HTTP backend).

``PolicyChatModel(policy=..., temperature=..., ...)`` is a ``langchain_core`` ``BaseChatModel``: ``invoke``,
``batch`` and ``stream`` work as for any LangChain chat model, and LangChain chains and agents can run on the
local policy. LangChain messages map to chat roles (system → system, human → user, ai → assistant, tool →
tool); the policy's own chat template renders them. Decoding settings are fields of the model and can be
overridden per call (``model.invoke(msgs, temperature=0.2, stop=["\\n"])``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from ragloop.core.errors import UsageError
from ragloop.models.types import GenerationConfig, Policy

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "function": "tool"}
_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "greedy", "seed", "repetition_penalty")


def to_chat_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages → ``{"role", "content"}`` dicts (multimodal content keeps its text parts)."""
    out = []
    for m in messages:
        role = _ROLES.get(m.type)
        if role is None:
            role = str(getattr(m, "role", "user"))  # ChatMessage carries its own role
        content = m.content if isinstance(m.content, str) else "".join(
            part if isinstance(part, str) else str(part.get("text", "")) for part in m.content
        )
        out.append({"role": role, "content": content})
    return out


class PolicyChatModel(BaseChatModel):
    """LangChain ``BaseChatModel`` adapter over a ragloop ``Policy``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    policy: Any = Field(description="the ragloop Policy that generates")
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = Field(default_factory=list)

    def model_post_init(self, __context: Any) -> None:
        if not isinstance(self.policy, Policy):
            raise UsageError(f"policy must implement ragloop's Policy protocol, got {type(self.policy).__name__}")

    @property
    def _llm_type(self) -> str:
        return "ragloop-policy"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"policy": getattr(self.policy, "name", "?"), **{k: getattr(self, k) for k in _SETTINGS}}

    def _config(self, stop: list[str] | None, kwargs: dict[str, Any], n: int = 1) -> GenerationConfig:
        settings = {k: kwargs.get(k, getattr(self, k)) for k in _SETTINGS}
        stops = list(self.stop) + list(stop or []) + list(kwargs.get("stop_sequences", []) or [])
        return GenerationConfig(**settings, stop=stops, n=n)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        cfg = self._config(stop, kwargs, n=int(kwargs.get("n", 1)))
        gens = self.policy.generate(to_chat_messages(messages), cfg)
        out = []
        for g in gens:
            usage = {"input_tokens": g.prompt_tokens, "output_tokens": g.num_tokens,
                     "total_tokens": g.prompt_tokens + g.num_tokens}
            msg = AIMessage(
                content=g.text,
                response_metadata={"finish_reason": g.finish_reason, "model_name": self.policy.name},
                usage_metadata=usage,
            )
            out.append(ChatGeneration(message=msg, generation_info={"finish_reason": g.finish_reason}))
        return ChatResult(generations=out)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        cfg = self._config(stop, kwargs)
        for piece in self.policy.stream(to_chat_messages(messages), cfg):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
