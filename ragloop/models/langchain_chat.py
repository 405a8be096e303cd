"""A LangChain chat model over any ragloop ``Policy`` (local, scripted, or an OpenAI-compatible server).

``PolicyChatModel(policy=..., temperature=..., ...)`` is a ``langchain_core`` ``BaseChatModel``: ``invoke``,
``batch`` and ``stream`` work as for any LangChain chat model, and LangChain chains and agents can run on the
policy. LangChain messages map to chat roles (system → system, human → user, ai → assistant, tool →
tool; an AI message's tool calls become the call text the model writes); the policy's own chat template
renders them. Decoding settings are fields of the model and can be overridden per call
(``model.invoke(msgs, temperature=0.2, stop=["\\n"], max_tokens=5)``); LangChain's ``max_tokens`` is an
alias of ``max_new_tokens`` and wins when given.

``timeout`` bounds one call's decode in seconds (a local policy is stopped between tokens and
``TimeoutError`` raised; an ``OpenAIPolicy`` passes it to its HTTP client); ``max_retries`` is the HTTP
client's retry count for an ``OpenAIPolicy`` (a local decode has no transient failures to retry).

Tool calling (``bind_tools``) and structured output (``with_structured_output``, methods
``function_calling`` — the default —, ``json_schema`` and ``json_mode``) use ``ragloop.models.tool_calling``: the tools
are described in the system prompt, and when a call is required (``tool_choice="any"``/"required"/a name,
which is what ``with_structured_output`` asks for) the decode is constrained by a JSON-schema grammar, so
the call parses and matches the tool's schema. Streamed chunks end with one chunk carrying the usage
metadata, the finish reason and the model name.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field

from ragloop.core.errors import UsageError
from ragloop.models.tool_calling import (
    add_system_text,
    call_text,
    parse_tool_calls,
    plan_tools,
    response_format_grammar,
)
from ragloop.models.types import Generation, GenerationConfig, GrammarSpec

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "function": "tool"}
_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "greedy", "seed", "repetition_penalty")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part if isinstance(part, str) else str(part.get("text", "")) for part in content
                   if isinstance(part, str) or part.get("type", "text") == "text")


def to_chat_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages → ``{"role", "content"}`` dicts (multimodal content keeps its text parts; an AI
    message's tool calls are written as the JSON calls the model emits)."""
    out = []
    for m in messages:
        role = _ROLES.get(m.type)
        if role is None:
            role = str(getattr(m, "role", "user"))  # ChatMessage carries its own role
        content = _text(m.content)
        calls = getattr(m, "tool_calls", None) or []
        if calls:
            content = "\n".join(([content] if content else []) + [call_text(c["name"], c["args"]) for c in calls])
        out.append({"role": role, "content": content})
    return out


class PolicyChatModel(BaseChatModel):
    """LangChain ``BaseChatModel`` adapter over a ragloop ``Policy`` (see the module docstring)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    policy: Any = Field(description="the ragloop Policy that generates")
    model_name: str | None = Field(default=None, alias="model", description="reported model name (default: policy.name)")
    max_new_tokens: int = 256
    max_tokens: int | None = Field(default=None, description="LangChain's name for max_new_tokens (wins when set)")
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = Field(default_factory=list)
    timeout: float | None = Field(default=None, description="seconds one call may take (None = no limit)")
    max_retries: int | None = Field(default=None, description="HTTP retries of a remote policy (None = its own)")

    def model_post_init(self, __context: Any) -> None:
        # a structural check on the class: isinstance(…, Policy) would read every attribute, and a remote
        # policy's context_window is a property that asks its server
        needed = ("generate", "generate_batch", "stream", "render", "count_tokens", "tokenize", "detokenize")
        if not all(callable(getattr(type(self.policy), m, None)) for m in needed):
            raise UsageError(f"policy must implement ragloop's Policy protocol, got {type(self.policy).__name__}")

    @property
    def _llm_type(self) -> str:
        return "ragloop-policy"

    @property
    def name_of_model(self) -> str:
        return self.model_name or getattr(self.policy, "name", "ragloop")

    def _model_for(self, kwargs: dict[str, Any]) -> str:
        """The model name a call reports: a per-call ``model=`` (LangChain's override) or ours."""
        return str(kwargs.get("model") or self.name_of_model)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"policy": getattr(self.policy, "name", "?"), "model_name": self.name_of_model,
                **{k: getattr(self, k) for k in _SETTINGS}, "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ragloop"
        params["ls_model_name"] = self._model_for(kwargs)
        params["ls_model_type"] = "chat"
        params["ls_temperature"] = 0.0 if kwargs.get("greedy", self.greedy) else kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = self._max_tokens(kwargs)
        stops = list(self.stop) + list(stop or [])
        if stops:
            params["ls_stop"] = stops
        return params

    # -- settings -----------------------------------------------------------------------------------------

    def _max_tokens(self, kwargs: dict[str, Any]) -> int:
        for v in (kwargs.get("max_tokens"), kwargs.get("max_new_tokens"), self.max_tokens):
            if v is not None:
                return int(v)
        return self.max_new_tokens

    def _config(self, stop: list[str] | None, kwargs: dict[str, Any], n: int = 1,
                grammar: GrammarSpec | None = None) -> GenerationConfig:
        settings = {k: kwargs.get(k, getattr(self, k)) for k in _SETTINGS}
        settings["max_new_tokens"] = self._max_tokens(kwargs)
        stops = list(self.stop) + list(stop or []) + list(kwargs.get("stop_sequences", []) or [])
        return GenerationConfig(**settings, stop=stops, n=n, grammar=grammar)

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
                 n: int = 1) -> tuple[list[dict[str, str]], GenerationConfig, list[str]]:
        plan = plan_tools(kwargs.get("tools"), kwargs.get("tool_choice"))
        rf_grammar, rf_text = response_format_grammar(kwargs.get("response_format"))
        if plan.grammar is not None and rf_grammar is not None:
            raise UsageError("a required tool call and response_format cannot both constrain one answer")
        msgs = add_system_text(to_chat_messages(messages), "\n\n".join(t for t in (plan.instructions, rf_text) if t))
        return msgs, self._config(stop, kwargs, n=n, grammar=plan.grammar or rf_grammar), plan.names

    def _policy_for_call(self, kwargs: dict[str, Any]) -> Any:
        timeout = kwargs.get("timeout", self.timeout)
        retries = kwargs.get("max_retries", self.max_retries)
        with_options = getattr(self.policy, "with_options", None)
        if with_options is not None and (timeout is not None or retries is not None):
            return with_options(timeout=timeout, max_retries=retries)
        return self.policy

    def _decode(self, msgs: list[dict[str, str]], cfg: GenerationConfig, kwargs: dict[str, Any]) -> list[Generation]:
        """Generate ``cfg.n`` candidates, within ``timeout`` when one is set (checked between tokens)."""
        policy = self._policy_for_call(kwargs)
        timeout = kwargs.get("timeout", self.timeout)
        decode_run = getattr(policy, "decode_run", None)
        if decode_run is None or timeout is None:
            return policy.generate(msgs, cfg)
        deadline = time.monotonic() + float(timeout)
        run = decode_run([msgs], cfg)
        for _ in run:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name_of_model} did not finish within timeout={timeout} s")
        return run.results()[0]

    # -- messages -----------------------------------------------------------------------------------------

    def _message(self, g: Generation, tool_names: list[str]) -> AIMessage:
        usage = {"input_tokens": g.prompt_tokens, "output_tokens": g.num_tokens,
                 "total_tokens": g.prompt_tokens + g.num_tokens}
        meta = {"finish_reason": g.finish_reason, "model_name": self.name_of_model, "model_provider": "ragloop"}
        calls = parse_tool_calls(g.text, tool_names)
        if calls:
            return AIMessage(content="", usage_metadata=usage, response_metadata={**meta, "finish_reason": "tool_calls"},
                             tool_calls=[{"name": c.name, "args": json.loads(c.arguments), "id": f"call_{uuid.uuid4().hex[:16]}",
                                          "type": "tool_call"} for c in calls])
        return AIMessage(content=g.text, response_metadata=meta, usage_metadata=usage)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        msgs, cfg, names = self._prepare(messages, stop, kwargs, n=int(kwargs.get("n", 1)))
        gens = self._decode(msgs, cfg, kwargs)
        return ChatResult(generations=[
            ChatGeneration(message=self._message(g, names), generation_info={"finish_reason": g.finish_reason})
            for g in gens
        ])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        msgs, cfg, names = self._prepare(messages, stop, kwargs)
        if names:  # a tool call is only known once the whole text is: decode, then send it as one chunk
            g = self._decode(msgs, cfg, kwargs)[0]
            msg = self._message(g, names)
            chunk = AIMessageChunk(
                content=msg.content, usage_metadata=msg.usage_metadata, response_metadata=msg.response_metadata,
                tool_call_chunks=[tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"],
                                                  index=i) for i, c in enumerate(msg.tool_calls)],
                chunk_position="last",
            )
            yield ChatGenerationChunk(message=chunk)
            return
        for piece, gen in self._pieces(msgs, cfg, kwargs):
            if gen is None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            else:
                usage = {"input_tokens": gen.prompt_tokens, "output_tokens": gen.num_tokens,
                         "total_tokens": gen.prompt_tokens + gen.num_tokens}
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content="", usage_metadata=usage, chunk_position="last", response_metadata={
                        "finish_reason": gen.finish_reason, "model_name": self.name_of_model,
                        "model_provider": "ragloop"}),
                    generation_info={"finish_reason": gen.finish_reason},
                )

    def _pieces(self, msgs: list[dict[str, str]], cfg: GenerationConfig,
                kwargs: dict[str, Any]) -> Iterator[tuple[str, Generation | None]]:
        """``(piece, None)`` per decoded piece, then ``("", generation)``."""
        policy = self._policy_for_call(kwargs)
        timeout = kwargs.get("timeout", self.timeout)
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        decode_run = getattr(policy, "decode_run", None)
        if decode_run is not None:
            run = decode_run([msgs], cfg)
            for _, piece in run:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name_of_model} did not finish within timeout={timeout} s")
                yield piece, None
            yield "", run.results()[0][0]
            return
        pieces = []
        for piece in policy.stream(msgs, cfg):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.name_of_model} did not finish within timeout={timeout} s")
            pieces.append(piece)
            yield piece, None
        text = "".join(pieces)
        yield "", Generation(text=text, token_ids=policy.tokenize(text) if text else [], finish_reason="stop",
                             prompt_tokens=policy.count_tokens(msgs))

    # -- tools and structured output ---------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model; ``tool_choice``: "auto" (default), "none", "any"/"required"/True (a
        call is required), or a tool's name (that tool is required). Required calls are grammar-constrained."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice: Any = tool_choice
        if tool_choice is True:
            choice = "required"
        elif tool_choice is False:
            choice = None
        elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any", "required"):
            if tool_choice not in names:
                raise UsageError(f"tool_choice {tool_choice!r} is not among the tools ({', '.join(names)})")
            choice = {"type": "function", "function": {"name": tool_choice}}
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: str = "function_calling",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers as ``schema`` (a pydantic class, TypedDict or JSON schema). ``method="function_calling"``
        (default): a required call to a tool shaped like the schema; ``"json_schema"``: the answer itself is
        the JSON, decoded under the schema's grammar; ``"json_mode"``: any JSON object (the prompt names the keys)."""
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if method not in ("json_schema", "json_mode"):
            raise UsageError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
        kwargs.pop("strict", None)  # the grammar makes every answer match the schema: always strict
        if kwargs:
            raise UsageError(f"unsupported arguments: {', '.join(kwargs)}")
        if method == "json_mode":  # any JSON object; the prompt must say which keys
            llm = self.bind(response_format={"type": "json_object"})
        else:
            fn = convert_to_openai_tool(schema)["function"]
            llm = self.bind(response_format={"type": "json_schema",
                                             "json_schema": {"name": fn["name"], "schema": fn["parameters"]}})
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        parser: Runnable = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()  # type: ignore[arg-type]
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
