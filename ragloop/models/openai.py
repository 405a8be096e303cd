"""``OpenAIPolicy``: any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, TGI, ``ragloop serve``)
as a ragloop ``Policy``, through the official ``openai`` client.

Spec: ``--policy openai:MODEL@http://host:port/v1`` (``parse_openai_spec``); without ``@URL`` the base URL
comes from ``$OPENAI_BASE_URL``. The key comes from ``$OPENAI_API_KEY`` or ``$RAGLOOP_API_KEY`` (servers
that need none get a placeholder). Chat prompts (message lists) go to ``/v1/chat/completions``; raw string
prompts — what ReAct and PAL send after prefilling the rendered template — go to ``/v1/completions``.
Decoding settings map onto the API: temperature (0 when greedy), top_p, max_tokens, stop, n, seed,
logprobs; top_k, repetition_penalty and grammars ride in ``extra_body`` under vLLM's names (``top_k``,
``repetition_penalty``, ``guided_json`` / ``guided_regex`` / ``guided_grammar``), which ``ragloop serve``
understands too. ``generate_batch`` sends its prompts concurrently: the server batches them.

Timeouts and retries with exponential backoff are the client's own (``timeout``, ``max_retries``: it
retries connection errors, 408, 409, 429 and 5xx). Errors are one line: an unreachable server, a 4xx
with the server's own message, a model the server does not serve (with the ones it does).

What needs the server's tokenizer — ``tokenize``, ``detokenize``, ``count_tokens`` and ``render`` (the chat
template, which ReAct/PAL prefill) — uses ``/tokenize`` and ``/detokenize`` (vLLM's ``prompt`` and
llama.cpp's ``content`` fields are both sent and read) and llama.cpp's ``/apply-template`` (``ragloop serve``
has all three). Where a server lacks ``/tokenize``, ``count_tokens``
falls back to an estimate of 4 characters per token (logged once). ``score`` (teacher-forced
log-probabilities, used by the RLAIF/CAI judge) needs ``echo`` with logprobs on ``/v1/completions`` (vLLM,
and ``ragloop serve`` over a local policy).
Training needs local weights: ``policy.model`` raises a UsageError that says so.

What each server needs: vLLM ``--enable-auto-tool-choice --tool-call-parser NAME`` for tool calls (ragloop's
own tool format is plain JSON and needs nothing); llama.cpp's ``llama-server --jinja`` for the model's chat
template. See README "Scale-out".
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ragloop.core.errors import ModelLoadError, ModelNotFoundError, UsageError
from ragloop.models.types import ChatMessages, FinishReason, Generation, GenerationConfig, Prompt, as_messages

log = logging.getLogger(__name__)

PREFIX = "openai:"
SPEC_FORMAT = "openai:MODEL@http://HOST:PORT/v1"
KEY_VARS = ("OPENAI_API_KEY", "RAGLOOP_API_KEY")
CHARS_PER_TOKEN = 4  # the estimate used only when the server has no /tokenize (logged)


def parse_openai_spec(spec: str) -> tuple[str, str]:
    """``"openai:smollm2@http://127.0.0.1:8000/v1"`` → ``("smollm2", "http://127.0.0.1:8000/v1")``.

    The URL is everything after the last ``@`` that starts ``http``; without one, ``$OPENAI_BASE_URL``."""
    if not spec.startswith(PREFIX):
        raise UsageError(f"not an openai policy spec: {spec!r}", hint=f"write {SPEC_FORMAT}")
    body = spec[len(PREFIX):]
    model, sep, url = body.rpartition("@")
    if not sep or not url.startswith(("http://", "https://")):
        model, url = body, os.environ.get("OPENAI_BASE_URL", "")
    if not model:
        raise UsageError(f"no model name in {spec!r}", hint=f"write {SPEC_FORMAT}")
    if not url:
        raise UsageError(f"no server URL in {spec!r} and $OPENAI_BASE_URL is not set", hint=f"write {SPEC_FORMAT}")
    return model, url.rstrip("/")


def _grammar_extra(cfg: GenerationConfig) -> dict[str, Any]:
    g = cfg.grammar
    if g is None:
        return {}
    if g.kind == "json_schema":
        schema = json.loads(g.source)
        schema.pop("x-guidance", None)  # llguidance's formatting options: not every server's engine takes them
        return {"guided_json": schema}
    return {"guided_regex": g.source} if g.kind == "regex" else {"guided_grammar": g.source}


class OpenAIPolicy:
    """A remote model behind the OpenAI API as a ``Policy`` (see the module docstring)."""

    thread_safe = True  # calls are independent HTTP requests: ``ragloop serve`` may call it from many threads

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 3,
        context_window: int | None = None,
        max_concurrency: int = 16,
        client: Any = None,
    ) -> None:
        import httpx
        import openai

        self.model_id = model
        self.base_url = base_url.rstrip("/")
        self.name = f"openai:{model}"
        key = api_key or next((os.environ[v] for v in KEY_VARS if os.environ.get(v)), None) or "EMPTY"
        self.client = client or openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout,
                                              max_retries=max_retries)
        # vLLM and llama.cpp serve /tokenize etc. at the root, beside /v1
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self._http = httpx.Client(base_url=root, timeout=timeout, headers={"Authorization": f"Bearer {key}"})
        self._context_window = context_window
        self.max_concurrency = max_concurrency
        self._warned_estimate = False

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> OpenAIPolicy:
        model, url = parse_openai_spec(spec)
        return cls(model, url, **kwargs)

    def __repr__(self) -> str:
        return f"OpenAIPolicy(model={self.model_id!r}, base_url={self.base_url!r})"

    def with_options(self, *, timeout: float | None = None, max_retries: int | None = None) -> OpenAIPolicy:
        """A copy whose requests use this timeout / retry count (None keeps the current one)."""
        import copy

        opts: dict[str, Any] = {}
        if timeout is not None:
            opts["timeout"] = timeout
        if max_retries is not None:
            opts["max_retries"] = max_retries
        clone = copy.copy(self)
        clone.client = self.client.with_options(**opts) if opts else self.client
        return clone

    # -- training refuses -------------------------------------------------------------------------------

    def _no_weights(self) -> UsageError:
        return UsageError(f"{self.name} is a remote server: training needs local weights",
                          hint="train a local model (--policy default, an HF directory or a checkpoint), then serve it")

    @property
    def model(self) -> Any:
        raise self._no_weights()

    @property
    def tokenizer(self) -> Any:
        raise self._no_weights()

    def logprobs_of(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_weights()

    # -- errors -----------------------------------------------------------------------------------------

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        import openai

        try:
            return fn(**kwargs)
        except openai.APIConnectionError as e:
            kind = "timed out" if isinstance(e, openai.APITimeoutError) else "is unreachable"
            raise ModelLoadError(f"the OpenAI-compatible server at {self.base_url} {kind}",
                                 hint="start it (e.g. ragloop serve, or vllm serve MODEL) or fix the URL in --policy"
                                 ) from None
        except openai.AuthenticationError as e:
            raise UsageError(f"{self.base_url} refused the API key: {self._server_message(e)}",
                             hint="set OPENAI_API_KEY or RAGLOOP_API_KEY") from None
        except openai.NotFoundError as e:
            served = self._served_models()
            listing = f"; it serves: {', '.join(served)}" if served else ""
            raise ModelNotFoundError(f"{self.base_url}: {self._server_message(e)}{listing}",
                                     hint=f"use --policy openai:NAME@{self.base_url} with a served NAME") from None
        except openai.APIStatusError as e:
            err = UsageError if 400 <= e.status_code < 500 else ModelLoadError
            raise err(f"{self.base_url} answered {e.status_code}: {self._server_message(e)}") from None

    @staticmethod
    def _server_message(e: Any) -> str:
        body = getattr(e, "body", None)
        if isinstance(body, dict):
            inner = body.get("error", body)
            if isinstance(inner, dict) and inner.get("message"):
                return str(inner["message"])
            if isinstance(body.get("message"), str):
                return body["message"]
        return str(getattr(e, "message", e))

    def _served_models(self) -> list[str]:
        try:
            return [m.id for m in self.client.models.list().data]
        except Exception:  # best effort: only used to enrich an error message
            return []

    # -- context window ---------------------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        """From the server's model card (vLLM / ragloop give ``max_model_len``); checks the model is served."""
        if self._context_window is None:
            card = self._call(self.client.models.retrieve, model=self.model_id)
            extra = getattr(card, "model_extra", None) or {}
            cw = extra.get("max_model_len") or extra.get("context_length") or (extra.get("meta") or {}).get("n_ctx_train")
            if not cw:
                log.warning("%s does not say its context window; assuming 4096 (pass context_window=)", self.name)
                cw = 4096
            self._context_window = int(cw)
        return self._context_window

    # -- text -------------------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST to a root endpoint; None when the server does not have it (404/405/501)."""
        import httpx

        try:
            r = self._http.post(path, json={"model": self.model_id, **body})
        except httpx.HTTPError:
            raise ModelLoadError(f"the OpenAI-compatible server at {self.base_url} is unreachable",
                                 hint="start it or fix the URL in --policy") from None
        if r.status_code in (404, 405, 501):
            return None
        if r.status_code >= 400:
            raise UsageError(f"{self.base_url}{path} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def render(self, messages: ChatMessages, *, add_generation_prompt: bool = True) -> str:
        """The server's chat template applied to ``messages`` (llama.cpp / ragloop ``/apply-template``, else
        vLLM's ``/tokenize`` of the messages detokenized)."""
        msgs = as_messages(messages)
        out = self._post("/apply-template", {"messages": msgs, "add_generation_prompt": add_generation_prompt})
        if out is not None and isinstance(out.get("prompt"), str):
            return out["prompt"]
        toks = self._post("/tokenize", {"messages": msgs, "add_generation_prompt": add_generation_prompt})
        if toks is not None:
            return self.detokenize(toks["tokens"])
        raise UsageError(f"{self.base_url} does not expose its chat template (no /apply-template or /tokenize)",
                         hint="agents that prefill the template (react paper format, pal) need vLLM, llama.cpp "
                              "server or ragloop serve; chat-only agents work on any server")

    def tokenize(self, text: str) -> list[int]:
        out = self._post("/tokenize", {"prompt": text, "content": text, "add_special_tokens": False})
        if out is None:
            raise UsageError(f"{self.base_url} has no /tokenize endpoint; token ids are not available")
        return [int(t) for t in out["tokens"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        out = self._post("/detokenize", {"tokens": [int(i) for i in ids]})
        if out is None:
            raise UsageError(f"{self.base_url} has no /detokenize endpoint")
        return str(out["prompt"] if "prompt" in out else out.get("content", ""))  # vLLM | llama.cpp

    def count_tokens(self, prompt: Prompt) -> int:
        body: dict[str, Any] = (
            {"prompt": prompt, "content": prompt, "add_special_tokens": False} if isinstance(prompt, str)
            else {"messages": as_messages(prompt), "add_generation_prompt": True}
        )
        out = self._post("/tokenize", body)
        if out is not None:
            return int(out.get("count", len(out["tokens"])))
        text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in as_messages(prompt))
        if not self._warned_estimate:
            log.warning("%s has no /tokenize; estimating %d characters per token", self.base_url, CHARS_PER_TOKEN)
            self._warned_estimate = True
        return max(1, len(text) // CHARS_PER_TOKEN)

    # -- decoding ---------------------------------------------------------------------------------------

    def _request(self, prompt: Prompt, cfg: GenerationConfig, *, stream: bool = False) -> tuple[Any, dict[str, Any]]:
        if isinstance(prompt, str) and not prompt.strip() or not isinstance(prompt, str) and not as_messages(prompt):
            raise UsageError("the prompt is empty", hint="give some text or at least one message")
        kwargs: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": cfg.max_new_tokens,
            "temperature": 0.0 if cfg.greedy else cfg.temperature,
            "top_p": cfg.top_p,
            "n": cfg.n,
        }
        if cfg.stop:
            kwargs["stop"] = list(cfg.stop)
        if cfg.seed is not None:
            kwargs["seed"] = cfg.seed
        extra: dict[str, Any] = _grammar_extra(cfg)
        if cfg.top_k:
            extra["top_k"] = cfg.top_k
        if cfg.repetition_penalty != 1.0:
            extra["repetition_penalty"] = cfg.repetition_penalty
        if cfg.logprobs and not stream:
            extra["return_tokens_as_token_ids"] = True  # vLLM / ragloop: logprob tokens as "token_id:N"
        if extra:
            kwargs["extra_body"] = extra
        if stream:
            kwargs["stream"] = True
        if isinstance(prompt, str):
            if cfg.logprobs and not stream:
                kwargs["logprobs"] = 1
            return self.client.completions.create, {"prompt": prompt, **kwargs}
        if cfg.logprobs and not stream:
            kwargs["logprobs"] = True
        return self.client.chat.completions.create, {"messages": as_messages(prompt), **kwargs}

    @staticmethod
    def _finish(choice: Any) -> FinishReason:
        if choice.finish_reason == "length":
            return "length"
        extra = getattr(choice, "model_extra", None) or {}
        if "stop_reason" in extra:  # vLLM: the matched stop string, or None for the end-of-sequence token
            return "stop" if isinstance(extra["stop_reason"], str) else "eos"
        return "eos"

    @staticmethod
    def _token_id(token: str) -> int | None:
        if token.startswith("token_id:"):
            try:
                return int(token[len("token_id:"):])
            except ValueError:
                return None
        return None

    def _generations(self, resp: Any, chat: bool) -> list[Generation]:
        prompt_tokens = int(getattr(resp.usage, "prompt_tokens", 0) or 0) if resp.usage else 0
        out = []
        for choice in sorted(resp.choices, key=lambda c: c.index):
            if chat:
                text = choice.message.content or ""
                calls = choice.message.tool_calls or []
                if calls and not text:  # a server-side tool parser took the call out of the text
                    text = "\n".join(json.dumps({"name": c.function.name, "arguments": json.loads(c.function.arguments
                                                 or "{}")}) for c in calls)
                entries = (choice.logprobs.content or []) if choice.logprobs else []
                tokens = [(e.token, e.logprob) for e in entries]
            else:
                text = choice.text or ""
                lp = choice.logprobs
                tokens = list(zip(lp.tokens or [], lp.token_logprobs or [], strict=False)) if lp else []
            ids = [self._token_id(t) for t, _ in tokens]
            token_ids = [i for i in ids if i is not None] if tokens and all(i is not None for i in ids) else []
            logprobs = [float(v) for _, v in tokens] if tokens else None
            out.append(Generation(text=text, token_ids=token_ids, finish_reason=self._finish(choice),
                                  logprobs=logprobs, prompt_tokens=prompt_tokens))
        return out

    def generate(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> list[Generation]:
        """``cfg.n`` candidates for one prompt (one request with ``n``)."""
        cfg = cfg or GenerationConfig()
        fn, kwargs = self._request(prompt, cfg)
        resp = self._call(fn, **kwargs)
        return self._generations(resp, chat=not isinstance(prompt, str))

    def generate_batch(self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None) -> list[list[Generation]]:
        """One request per prompt, sent concurrently (the server batches them); results in prompt order."""
        if isinstance(prompts, str):
            raise UsageError("generate_batch takes a list of prompts, not one string")
        prompts = list(prompts)
        if len(prompts) <= 1:
            return [self.generate(p, cfg) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self.generate(p, cfg), prompts))

    def stream(self, prompt: Prompt, cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Text pieces of one candidate as the server sends them (SSE)."""
        cfg = cfg or GenerationConfig()
        if cfg.n != 1:
            raise UsageError(f"streaming produces one candidate; got n={cfg.n}", hint="use n=1 to stream")
        fn, kwargs = self._request(prompt, cfg, stream=True)
        chat = not isinstance(prompt, str)
        for chunk in self._call(fn, **kwargs):
            if not chunk.choices:
                continue
            piece = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) or ""
            if piece:
                yield piece

    def score(self, prompt: Prompt, continuation: str) -> list[float]:
        """Per-token log-probabilities of ``continuation`` after ``prompt``, from the server's prompt
        log-probabilities (``echo=True`` on ``/v1/completions``; vLLM and ``ragloop serve`` give them)."""
        text = prompt if isinstance(prompt, str) else self.render(prompt)
        full = text + continuation
        try:
            resp = self._call(self.client.completions.create, model=self.model_id, prompt=full, max_tokens=1,
                              echo=True, logprobs=0, temperature=0.0)
        except UsageError as e:
            raise UsageError(f"{self.base_url} cannot score text (needs echo with logprobs): {e.message}",
                             hint="score with a local policy, a vLLM server or ragloop serve") from None
        lp = resp.choices[0].logprobs
        if lp is None or not lp.text_offset:
            raise UsageError(f"{self.base_url} returned no prompt log-probabilities for echo=True",
                             hint="score with a local policy or a vLLM server")
        # tokens that start inside the continuation, excluding the one generated token at the end
        return [float(v) for off, v in zip(lp.text_offset, lp.token_logprobs, strict=False)
                if len(text) <= off < len(full) and v is not None]
