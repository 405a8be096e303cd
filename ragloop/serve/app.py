"""``create_app``: an OpenAI-compatible HTTP API over any ragloop policy (FastAPI, served by uvicorn).

Endpoints: ``POST /v1/chat/completions`` (stream, n, stop, logprobs, tools/tool_choice, response_format),
``POST /v1/completions`` (with ``echo`` + logprobs: the prompt's own log-probabilities, for scoring), ``POST /v1/embeddings`` (the embedded MiniLM embedder), ``GET /v1/models``,
``GET /health``, and vLLM's ``POST /tokenize`` / ``POST /detokenize`` plus llama.cpp's
``POST /apply-template`` (so ``ragloop.models.openai.OpenAIPolicy`` can count tokens and render the chat
template of the model it talks to).

Endpoints are ``async``; decoding runs in the thread pool through one ``Decoder`` (``decoder.py``): a
``LocalPolicy`` decodes concurrent requests together on its decode engine (continuous batching), and a
policy that is not thread-safe gets one worker thread that batches the requests queued for it. Required tool calls and ``response_format`` JSON are enforced by a
``GrammarSpec`` on the decode (``ragloop.models.tool_calling``). Errors are OpenAI-style bodies
(``{"error": {"message", "type", "param", "code"}}``) with the right status: 400 bad request (a prompt over
the context window says by how much), 401 bad API key, 404 unknown model or route, 500 with the error's
type and a pointer to the server log — never a traceback.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragloop.core.errors import ContextWindowError, RagloopError, UsageError
from ragloop.models.chat import check_fits
from ragloop.models.tool_calling import (
    add_system_text,
    call_text,
    parse_tool_calls,
    plan_tools,
    response_format_grammar,
)
from ragloop.models.types import Generation, GenerationConfig, GrammarSpec, Policy, Prompt
from ragloop.serve.capture import TraceCapture
from ragloop.serve.decoder import Decoder, StreamResult
from ragloop.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    finish_reason,
    new_id,
    now,
    token_strings,
    usage,
)

log = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
          "function": "tool"}


@dataclass
class ServeConfig:
    """Settings of one server."""

    model_name: str | None = None  # the id clients send as "model" (default: the policy's name)
    api_key: str | None = None  # when set, every /v1 call needs "Authorization: Bearer <key>"
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context window)
    capture_dir: str | None = None  # write every call as a Trace (capture.py)
    # "queue": one worker batches requests; "direct": the policy is thread-safe and batches concurrent calls
    # itself; "auto": direct for such a policy (``policy_is_thread_safe``), else queue
    decode_mode: str = "auto"
    embedder_factory: Callable[[], Any] | None = None  # () -> Embedder, loaded on first use
    extra_model_names: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """One chat/completion request turned into what the decoder needs."""

    prompt: Prompt
    cfg: GenerationConfig
    prompt_tokens: int
    tool_names: list[str]
    force_tool: bool
    as_ids: bool = False  # logprob tokens as "token_id:N"


def _text_of(m: ChatMessageIn, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise APIError(400, f"messages[{i}] has a content part of type {part.get('type')!r}; this model reads "
                           "text only", param=f"messages[{i}].content")
    return "".join(parts)


def to_policy_messages(messages: list[ChatMessageIn]) -> list[dict[str, str]]:
    """OpenAI messages → ``{"role", "content"}`` dicts the chat template renders; an assistant turn's tool
    calls become the call text the model writes (``tool_calling.call_text``)."""
    out = []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {m.role!r}",
                           param=f"messages[{i}].role")
        text = _text_of(m, i)
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                fn = c.get("function") or {}
                calls.append(call_text(str(fn.get("name", "")), fn.get("arguments", "{}")))
            text = "\n".join(([text] if text else []) + calls)
        out.append({"role": role, "content": text})
    return out


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])  # no limit of 4 (OpenAI's): PAL sends 6
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must be non-empty strings", param="stop")
    return stops


def _refuse_unsupported(req: Any) -> None:
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported; use repetition_penalty (CTRL-style) instead", param=name)


def policy_is_thread_safe(policy: Any) -> bool:
    """True when ``policy`` may be called from many threads and batches concurrent calls itself: it says so
    (``thread_safe = True``, e.g. ``OpenAIPolicy``) or decodes on a ``DecodeEngine`` (``LocalPolicy.submit``,
    continuous batching, ``ragloop.models.engine``)."""
    return bool(getattr(type(policy), "thread_safe", False)) or callable(getattr(type(policy), "submit", None))


class _App:
    """The state behind the routes (no globals): policy, decoder, embedder, capture."""

    def __init__(self, policy: Policy, cfg: ServeConfig) -> None:
        self.policy = policy
        self.cfg = cfg
        self.model_name = cfg.model_name or policy.name
        mode = cfg.decode_mode
        if mode == "auto":
            mode = "direct" if policy_is_thread_safe(policy) else "queue"
        if mode not in ("queue", "direct"):
            raise UsageError(f"decode_mode must be auto, queue or direct, got {cfg.decode_mode!r}")
        self.decoder = Decoder(policy, mode=mode)  # type: ignore[arg-type]
        self.capture = TraceCapture(cfg.capture_dir) if cfg.capture_dir else None
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self.started = time.time()

    # -- helpers -------------------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name not in (self.model_name, self.policy.name, *self.cfg.extra_model_names):
            raise APIError(404, f"The model '{name}' is not served here; this server serves '{self.model_name}'",
                           type="invalid_request_error", param="model", code="model_not_found")

    def embedder(self) -> Any:
        with self._embed_lock:
            if self._embedder is None:
                if self.cfg.embedder_factory is None:
                    from ragloop.retrieval.embeddings import load_embedder

                    self._embedder = load_embedder(None)
                else:
                    self._embedder = self.cfg.embedder_factory()
            return self._embedder

    def build(self, req: Any, prompt: Prompt, *, logprobs: bool, grammar: GrammarSpec | None,
              tool_names: list[str], force_tool: bool) -> _Plan:
        _refuse_unsupported(req)
        try:
            n_prompt = self.policy.count_tokens(prompt)
        except UsageError as e:
            raise APIError(400, str(e), param="messages" if not isinstance(prompt, str) else "prompt") from None
        cw = self.policy.context_window
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        try:
            if max_tokens is None:
                check_fits(n_prompt, 1, cw)
                max_tokens = min(self.cfg.default_max_tokens, cw - n_prompt)
            check_fits(n_prompt, max_tokens, cw)
        except ContextWindowError as e:
            over = n_prompt + (max_tokens or 1) - cw
            raise APIError(400, f"{e.message}: {over} tokens too many ({e.hint})",
                           param="messages" if not isinstance(prompt, str) else "prompt",
                           code="context_length_exceeded") from None
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            gcfg = GenerationConfig(
                max_new_tokens=max_tokens,
                temperature=temperature,
                greedy=temperature == 0,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=max(0, req.top_k or 0),
                repetition_penalty=req.repetition_penalty or 1.0,
                stop=_stops(req.stop),
                n=req.n,
                seed=req.seed,
                logprobs=logprobs or self.capture is not None,
                grammar=grammar,
            )
        except UsageError as e:
            raise APIError(400, str(e)) from None
        return _Plan(prompt, gcfg, n_prompt, tool_names, force_tool, as_ids=req.return_tokens_as_token_ids)

    async def decode(self, plan: _Plan) -> list[Generation]:
        try:
            return (await run_in_threadpool(self.decoder.generate, [plan.prompt], plan.cfg))[0]
        except UsageError as e:
            raise APIError(400, str(e)) from None

    def record(self, endpoint: str, rid: str, plan: _Plan, gens: list[Generation], texts: list[str],
               started: float) -> None:
        if self.capture is not None:
            self.capture.record(endpoint=endpoint, request_id=rid, policy=self.policy.name, prompt=plan.prompt,
                                generations=gens, texts=texts, cfg=plan.cfg, started=started)


def _chat_plan(state: _App, req: ChatCompletionRequest) -> _Plan:
    state.check_model(req.model)
    if req.top_logprobs:
        raise APIError(400, "top_logprobs is not supported: ragloop returns the log-probability of each chosen "
                       "token (logprobs=true) without alternatives", param="top_logprobs")
    try:
        tplan = plan_tools(req.tools, req.tool_choice)
        rf_grammar, rf_text = response_format_grammar(req.response_format)
    except UsageError as e:
        raise APIError(400, str(e), param="tools" if req.tools else "response_format") from None
    guided = req.guided()
    if sum(x is not None for x in (tplan.grammar, rf_grammar, guided)) > 1:
        raise APIError(400, "only one of a required tool call, response_format and guided_* may constrain an answer",
                       param="response_format")
    msgs = to_policy_messages(req.messages)
    msgs = add_system_text(msgs, "\n\n".join(t for t in (tplan.instructions, rf_text) if t))
    return state.build(req, msgs, logprobs=req.logprobs, grammar=tplan.grammar or rf_grammar or guided,
                       tool_names=tplan.names, force_tool=tplan.force)


def _chat_choice(state: _App, plan: _Plan, i: int, g: Generation, with_logprobs: bool) -> dict[str, Any]:
    calls = parse_tool_calls(g.text, plan.tool_names)
    message: dict[str, Any] = {"role": "assistant", "content": g.text}
    reason = finish_reason(g.finish_reason)
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": new_id("call"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]}
        reason = "tool_calls"
    lp = None
    if with_logprobs and g.logprobs is not None:
        lp = {"content": [
            {"token": t, "logprob": v, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
            for t, v in zip(token_strings(state.policy, g.token_ids, as_ids=plan.as_ids), g.logprobs, strict=False)
        ]}
    return {"index": i, "message": message, "logprobs": lp, "finish_reason": reason, "stop_reason": _stop_reason(g)}


def _prompt_logprobs(policy: Any, prompt: str) -> tuple[list[int], list[float | None]]:
    """The prompt's token ids and each one's log-probability given those before it (None for the first):
    one teacher-forced forward pass (``LocalPolicy.logprobs_of``), as OpenAI's ``echo`` returns them."""
    import torch

    ids = policy.tokenize(prompt)
    lp = policy.logprobs_of(torch.tensor([ids], dtype=torch.long))[0].tolist()  # (T,); lp[0] is 0 by convention
    return ids, [None, *lp[1:]]


def _stop_reason(g: Generation) -> str | None:
    """vLLM's ``stop_reason``: None when the model ended (end-of-sequence token) or ran out of tokens, a
    string when a stop sequence ended it (ragloop does not record which one, so the string is "stop")."""
    return "stop" if g.finish_reason == "stop" else None


def _sse(obj: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(obj, ensure_ascii=False)}


def create_app(policy: Policy, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``policy`` (see the module docstring)."""
    cfg = config or ServeConfig()
    state = _App(policy, cfg)
    app = FastAPI(title="ragloop", description="OpenAI-compatible API over a ragloop policy", docs_url=None,
                  redoc_url=None)
    app.state.ragloop = state

    # -- errors: OpenAI bodies, never a traceback ----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        return JSONResponse(APIError(400, msg, param=loc or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(APIError(exc.status_code, msg, code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, UsageError):
            return JSONResponse(APIError(400, str(exc)).body(), status_code=400)
        log.exception("error serving %s", request.url.path)
        kind = "server_error"
        msg = str(exc) if isinstance(exc, RagloopError) else f"internal error ({type(exc).__name__}); see the server log"
        return JSONResponse(APIError(500, msg, type=kind).body(), status_code=500)

    async def auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    guarded = [Depends(auth)]

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        import importlib.util

        return {"status": "ok", "model": state.model_name, "context_window": policy.context_window,
                "uptime_s": round(time.time() - state.started, 1), "decode_batches": state.decoder.batches,
                "grammar": importlib.util.find_spec("ragloop.models.grammar") is not None,
                "capture": str(state.capture.path) if state.capture else None}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        data = [{"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "ragloop",
                 "max_model_len": policy.context_window}]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def model_card(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "ragloop",
                "max_model_len": policy.context_window}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(req: ChatCompletionRequest) -> Any:
        started = time.time()
        plan = await run_in_threadpool(_chat_plan, state, req)  # counting tokens may be a call to another server
        rid, created = new_id("chatcmpl"), now()
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        live = req.stream and plan.cfg.n == 1 and not plan.tool_names and plan.cfg.grammar is None and not req.logprobs
        if req.stream and live:
            return EventSourceResponse(_live_chat(state, plan, head, include_usage, rid, started))
        gens = await state.decode(plan)
        choices = [_chat_choice(state, plan, i, g, req.logprobs) for i, g in enumerate(gens)]
        state.record("chat", rid, plan, gens, [g.text for g in gens], started)
        use = usage(gens, plan.prompt_tokens)
        if not req.stream:
            return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                    "choices": choices, "usage": use, "system_fingerprint": None}

        async def replay() -> AsyncIterator[dict[str, str]]:  # n > 1, tools or a grammar: decoded, then sent
            for c in choices:
                delta = {"role": "assistant", **{k: v for k, v in c["message"].items() if k != "role"}}
                if "tool_calls" in delta:
                    delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(delta["tool_calls"])]
                yield _sse({**head, "choices": [{"index": c["index"], "delta": delta, "logprobs": c["logprobs"],
                                                 "finish_reason": None}]})
                yield _sse({**head, "choices": [{"index": c["index"], "delta": {}, "logprobs": None,
                                                 "finish_reason": c["finish_reason"]}]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": use})
            yield {"data": "[DONE]"}

        return EventSourceResponse(replay())

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(req: CompletionRequest) -> Any:
        started = time.time()
        state.check_model(req.model)
        if req.suffix or (req.best_of or 1) > 1 or req.logprobs and req.logprobs > 1:
            name = "suffix" if req.suffix else "best_of" if (req.best_of or 1) > 1 else "logprobs"
            raise APIError(400, f"{name} is not supported by this server (logprobs may be 0 or 1)", param=name)
        if req.echo and (req.stream or not callable(getattr(policy, "logprobs_of", None))):
            raise APIError(400, "echo needs a local policy and stream=false (prompt log-probabilities come from a "
                           "forward pass over the prompt)", param="echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "prompt must be a string or a list of strings (token-id prompts are not supported)",
                           param="prompt")
        plans = await run_in_threadpool(lambda: [
            state.build(req, p, logprobs=req.logprobs is not None, grammar=req.guided(), tool_names=[], force_tool=False)
            for p in prompts])
        rid, created = new_id("cmpl"), now()
        if req.stream and len(plans) == 1 and plans[0].cfg.n == 1 and req.logprobs is None and plans[0].cfg.grammar is None:
            head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_live_completion(state, plans[0], head, include_usage, rid, started))
        shared = min((p.cfg for p in plans), key=lambda c: c.max_new_tokens)  # one batch: the tightest budget
        try:
            outs = await run_in_threadpool(state.decoder.generate, prompts, shared)
        except UsageError as e:
            raise APIError(400, str(e)) from None
        echoed = await run_in_threadpool(lambda: [_prompt_logprobs(policy, p) for p in prompts]) if req.echo else None
        choices, all_gens = [], []
        for p_i, (plan, gens) in enumerate(zip(plans, outs, strict=True)):
            state.record("completions", rid, plan, gens, [g.text for g in gens], started)
            for g in gens:
                lp = None
                ids, values = list(g.token_ids), list(g.logprobs or [])
                if echoed is not None:  # the prompt's own tokens first (OpenAI's legacy echo; used for scoring)
                    ids, values = echoed[p_i][0] + ids, echoed[p_i][1] + values
                if req.logprobs is not None and (g.logprobs is not None or echoed is not None):
                    texts = token_strings(policy, ids)
                    toks = token_strings(policy, ids, as_ids=req.return_tokens_as_token_ids)
                    lp = {"tokens": toks, "token_logprobs": values, "top_logprobs": None,
                          "text_offset": list(np.cumsum([0] + [len(t) for t in texts[:-1]]).tolist())}
                text = (prompts[p_i] + g.text) if req.echo else g.text
                choices.append({"index": len(choices), "text": text, "logprobs": lp,
                                "finish_reason": finish_reason(g.finish_reason), "stop_reason": _stop_reason(g)})
                all_gens.append(g)
        use = usage(all_gens, sum(p.prompt_tokens for p in plans))
        body = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": use}
        if not req.stream:
            return body

        async def replay() -> AsyncIterator[dict[str, str]]:
            for c in choices:
                yield _sse({**body, "usage": None, "choices": [c]})
            yield {"data": "[DONE]"}

        return EventSourceResponse(replay())

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(req: EmbeddingRequest) -> Any:
        emb = await run_in_threadpool(state.embedder)
        if req.model not in (emb.name, "default", state.model_name):
            raise APIError(404, f"The embedding model '{req.model}' is not served here; this server embeds with "
                           f"'{emb.name}'", param="model", code="model_not_found")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a string or a list of strings (token-id input is not supported)",
                           param="input")
        if any(not t for t in texts):
            raise APIError(400, "input strings must not be empty", param="input")
        if req.dimensions is not None and req.dimensions != emb.dimension:
            raise APIError(400, f"{emb.name} gives {emb.dimension}-dimensional vectors, not {req.dimensions}",
                           param="dimensions")

        def run() -> tuple[np.ndarray, int]:
            with state._embed_lock:  # sentence-transformers models are not re-entrant
                return np.asarray(emb.embed_documents(texts), dtype=np.float32), sum(emb.count_tokens(texts))

        vecs, n_tokens = await run_in_threadpool(run)
        data = []
        for i, v in enumerate(vecs):
            value: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                          if req.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": emb.name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(req: TokenizeRequest) -> Any:
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            text = policy.render(to_policy_messages(req.messages), add_generation_prompt=req.add_generation_prompt)
        else:
            text = req.prompt or ""
        ids = policy.tokenize(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": policy.context_window}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(req: DetokenizeRequest) -> Any:
        return {"prompt": policy.detokenize(req.tokens)}

    @app.post("/apply-template", dependencies=guarded)
    async def apply_template(req: TokenizeRequest) -> Any:
        if req.messages is None:
            raise APIError(400, "messages is required", param="messages")
        return {"prompt": policy.render(to_policy_messages(req.messages), add_generation_prompt=req.add_generation_prompt)}

    @app.on_event("shutdown")
    def _close() -> None:
        state.decoder.close()

    return app


async def _stream_pieces(state: _App, plan: _Plan, rid: str, endpoint: str, started: float,
                         on_piece: Callable[[str], dict[str, Any]], on_end: Callable[[Generation | None, str],
                                                                                      list[dict[str, Any]]]
                         ) -> AsyncIterator[dict[str, str]]:
    cancel = threading.Event()
    result = StreamResult()
    pieces: list[str] = []
    try:
        async for piece in iterate_in_threadpool(state.decoder.stream(plan.prompt, plan.cfg, result, cancel)):
            pieces.append(piece)
            yield _sse(on_piece(piece))
    except UsageError as e:
        yield _sse(APIError(400, str(e)).body())
        yield {"data": "[DONE]"}
        return
    finally:
        cancel.set()  # the client went away (or we finished): stop decoding at the next token
    text = "".join(pieces)
    for obj in on_end(result.generation, text):
        yield _sse(obj)
    yield {"data": "[DONE]"}
    gen = result.generation
    if gen is None:  # a policy whose stream gives text only: its tokens are the text's tokenization
        gen = Generation(text=text, token_ids=state.policy.tokenize(text), finish_reason="stop",
                         prompt_tokens=plan.prompt_tokens)
    state.record(endpoint, rid, plan, [gen], [text], started)


def _end_usage(plan: _Plan, g: Generation | None, text: str, state: _App) -> dict[str, int]:
    n_out = g.num_tokens if g is not None else len(state.policy.tokenize(text)) if text else 0
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": n_out, "total_tokens": plan.prompt_tokens + n_out}


def _live_chat(state: _App, plan: _Plan, head: dict[str, Any], include_usage: bool, rid: str,
               started: float) -> AsyncIterator[dict[str, str]]:
    first = [True]

    def piece(text: str) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first[0] else {"content": text}
        first[0] = False
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

    def end(g: Generation | None, text: str) -> list[dict[str, Any]]:
        reason = finish_reason(g.finish_reason) if g is not None else "stop"
        out = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""} if first[0] else {},
                                     "logprobs": None, "finish_reason": reason}]}]
        if include_usage:
            out.append({**head, "choices": [], "usage": _end_usage(plan, g, text, state)})
        return out

    return _stream_pieces(state, plan, rid, "chat", started, piece, end)


def _live_completion(state: _App, plan: _Plan, head: dict[str, Any], include_usage: bool, rid: str,
                     started: float) -> AsyncIterator[dict[str, str]]:
    def piece(text: str) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}

    def end(g: Generation | None, text: str) -> list[dict[str, Any]]:
        reason = finish_reason(g.finish_reason) if g is not None else "stop"
        out = [{**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]}]
        if include_usage:
            out.append({**head, "choices": [], "usage": _end_usage(plan, g, text, state)})
        return out

    return _stream_pieces(state, plan, rid, "completions", started, piece, end)
