"""The OpenAI wire format the server speaks: request bodies (pydantic, validated at the boundary), the
response pieces built from ``Generation``s, and OpenAI-style errors.

Only what ragloop can honour is accepted: an option it cannot (``logit_bias``, non-zero presence/frequency
penalties, ``top_logprobs``, ``suffix``, token-id prompts) is a 400 that names it, never silently dropped.
Unknown extra fields that change nothing about decoding (``user``, ``metadata``, ``store`` …) are ignored,
as OpenAI-compatible servers do. Reference: the OpenAI API reference (Chat Completions, Completions,
Embeddings, Models) and vLLM's OpenAI-compatible server, whose ``/tokenize`` and ``/detokenize`` shapes
are copied so one client works with both.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragloop.models.types import FinishReason, Generation, GrammarSpec


class APIError(Exception):
    """An error the client should see: HTTP status + OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(_Request):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    # ragloop / vLLM extensions (vLLM's names, so one client drives both)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None  # a Lark grammar
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N"

    def guided(self) -> GrammarSpec | None:
        """The vLLM-style guided-decoding field as a GrammarSpec (at most one may be given)."""
        given = [k for k in ("guided_json", "guided_regex", "guided_grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise APIError(400, f"give at most one of {', '.join(given)}", param=given[1])
        if self.guided_json is not None:
            src = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return GrammarSpec("json_schema", src, name="guided_json")
        if self.guided_regex is not None:
            return GrammarSpec("regex", self.guided_regex, name="guided_regex")
        if self.guided_grammar is not None:
            return GrammarSpec("lark", self.guided_grammar, name="guided_grammar")
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: FinishReason) -> str:
    """ragloop's ``eos``/``stop``/``length`` → OpenAI's ``stop``/``length``."""
    return "length" if reason == "length" else "stop"


def usage(generations: list[Generation], prompt_tokens: int) -> dict[str, int]:
    out = sum(g.num_tokens for g in generations)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}


def token_strings(policy: Any, ids: list[int], *, as_ids: bool = False) -> list[str]:
    """Each token's text (or ``"token_id:N"``, vLLM's ``return_tokens_as_token_ids`` form)."""
    return [f"token_id:{i}" if as_ids else policy.detokenize([i]) for i in ids]
