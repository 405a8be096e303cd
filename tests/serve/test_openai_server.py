"""``ragloop serve`` through the official ``openai`` client over real HTTP on 127.0.0.1.

The scripted policy tests the protocol (chat, stream, n, tools, json_schema, embeddings, errors); the tiny
random model tests real decoding (concurrent == sequential greedy answers, logprobs, capture → SFT)."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import numpy as np
import openai
import pytest

from ragloop.core.trace import read_traces
from ragloop.models.scripted import ScriptedPolicy
from ragloop.models.types import GenerationConfig
from ragloop.retrieval.embeddings import HashingEmbedder
from tests.serve.conftest import WEATHER

MSG = [{"role": "user", "content": "Say hello."}]


def client(srv, key="-"):
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=60)


def test_chat_n_and_usage(scripted_server):
    c = client(scripted_server())
    r = c.chat.completions.create(model="scripted", messages=MSG, n=3, logprobs=True)
    assert [ch.message.content for ch in r.choices] == ["Hello there, friend."] * 3
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 3 * len(r.choices[0].logprobs.content) > 0
    assert "".join(t.token for t in r.choices[0].logprobs.content) == "Hello there, friend."
    assert all(t.logprob <= 0 for t in r.choices[0].logprobs.content)


def test_stream_pieces_and_usage(scripted_server):
    c = client(scripted_server())
    chunks = list(c.chat.completions.create(model="scripted", messages=MSG, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Hello there, friend."
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1  # really streamed
    assert chunks[-1].usage.completion_tokens == 7
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_stream_with_n(scripted_server):
    c = client(scripted_server())
    chunks = list(c.chat.completions.create(model="scripted", messages=MSG, stream=True, n=2))
    by_index = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert by_index == {0: "Hello there, friend.", 1: "Hello there, friend."}


def test_required_tool_call_is_grammar_constrained(scripted_server):
    seen = []

    def responder(text, cfg):
        seen.append(cfg.grammar)
        return '{"name": "get_weather", "arguments": {"city": "Paris"}}'

    c = client(scripted_server(ScriptedPolicy(responder, name="scripted")))
    r = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[WEATHER], tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    schema = json.loads(seen[0].source)
    assert seen[0].kind == "json_schema" and schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]


def test_auto_tool_call_parsed_and_history_rendered(scripted_server):
    c = client(scripted_server())
    r = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "weather in Oslo?"}],
                                  tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    # the call and its result go back into the conversation
    msgs = [{"role": "user", "content": "weather in Oslo?"}, r.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}, {"role": "user", "content": "thanks"}]
    r2 = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER])
    assert r2.choices[0].message.content == "Hello there, friend."


def test_json_schema_response_format(scripted_server):
    seen = []

    def responder(text, cfg):
        seen.append((text, cfg.grammar))
        return '{"answer": "4"}'

    c = client(scripted_server(ScriptedPolicy(responder, name="scripted")))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    r = c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "2+2?"}],
                                  response_format={"type": "json_schema", "json_schema": {"name": "ans", "schema": schema}})
    assert json.loads(r.choices[0].message.content) == {"answer": "4"}
    text, grammar = seen[0]
    compiled = json.loads(grammar.source)
    assert compiled.pop("x-guidance")["whitespace_flexible"] is False  # compact JSON: no budget spent on blanks
    assert grammar.kind == "json_schema" and compiled == schema and grammar.name == "json:ans"
    assert "JSON schema" in text  # the model is told the schema too


def test_embeddings_float_and_base64(scripted_server):
    c = client(scripted_server())
    r = c.embeddings.create(model="hashing-64", input=["a red apple", "blue sky"])  # client default: base64
    direct = HashingEmbedder(64).embed_documents(["a red apple", "blue sky"])
    assert np.allclose(np.array([d.embedding for d in r.data]), direct, atol=1e-6)
    raw = httpx.post(f"{c.base_url}embeddings", json={"model": "hashing-64", "input": "a red apple",
                                                      "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, direct[0], atol=1e-6)


def test_models_and_health(scripted_server):
    srv = scripted_server()
    assert [m.id for m in client(srv).models.list().data] == ["scripted"]
    assert client(srv).models.retrieve("scripted").id == "scripted"
    h = httpx.get(f"{srv.url}/health").json()
    assert h["status"] == "ok" and h["context_window"] == 8192


@pytest.mark.parametrize("kwargs, status, words", [
    ({"model": "gpt-4", "messages": MSG}, 404, "not served"),
    ({"model": "scripted", "messages": []}, 400, "messages"),
    ({"model": "scripted", "messages": MSG, "max_tokens": 10_000}, 400, "tokens too many"),
    ({"model": "scripted", "messages": MSG, "temperature": -1}, 400, "temperature"),
    ({"model": "scripted", "messages": MSG, "logprobs": True, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "scripted", "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ({"model": "scripted", "messages": MSG, "tools": [WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "not among the tools"),
    ({"model": "scripted", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
])
def test_bad_requests_get_openai_errors(scripted_server, kwargs, status, words):
    srv = scripted_server()
    r = httpx.post(f"{srv.base_url}/chat/completions", json=kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and "Traceback" not in r.text and set(err) == {"message", "type", "param", "code"}


def test_over_context_says_by_how_much(scripted_server):
    srv = scripted_server(ScriptedPolicy(["x"], name="scripted", context_window=64))
    r = httpx.post(f"{srv.base_url}/chat/completions",
                   json={"model": "scripted", "messages": [{"role": "user", "content": "word " * 100}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "context window is 64 tokens" in r.json()["error"]["message"]
    assert "tokens too many" in r.json()["error"]["message"]


def test_server_errors_have_no_traceback(scripted_server):
    def broken(text, cfg):
        raise RuntimeError("boom")

    srv = scripted_server(ScriptedPolicy(broken, name="scripted"))
    r = httpx.post(f"{srv.base_url}/chat/completions", json={"model": "scripted", "messages": MSG})
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"] and "Traceback" not in r.text
    bad = httpx.post(f"{srv.base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    assert httpx.get(f"{srv.url}/v2/nothing").status_code == 404


def test_api_key(scripted_server):
    srv = scripted_server(api_key="sesame")
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").models.list()
    assert client(srv, key="sesame").models.list().data[0].id == "scripted"
    assert httpx.get(f"{srv.url}/health").status_code == 200  # health needs no key


def test_completions_endpoint(scripted_server):
    c = client(scripted_server())
    r = c.completions.create(model="scripted", prompt=["Once", "Twice"], max_tokens=3, stop=["never"])
    assert [ch.text for ch in r.choices] == ["Hello there"] * 2 and r.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="scripted", prompt="Once", stream=True))
    assert streamed == "Hello there, friend."


# -- the tiny model: real decoding behind the server ------------------------------------------------------


def test_concurrent_clients_get_sequential_greedy_answers(scripted_server, tiny_policy):
    srv = scripted_server(tiny_policy)
    prompts = [f"Tell me about item {i}." for i in range(8)]

    def ask(p):
        r = client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                                temperature=0, max_tokens=12)
        return r.choices[0].message.content

    engine = tiny_policy._engine_for_decoding()
    steps0 = engine.steps
    sequential = [ask(p) for p in prompts]
    steps1 = engine.steps
    concurrent: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, ask(prompts[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [concurrent[i] for i in range(8)] == sequential
    direct = tiny_policy.generate([{"role": "user", "content": prompts[0]}], GenerationConfig(greedy=True, max_new_tokens=12))
    assert sequential[0] == direct[0].text
    assert srv.server.config.app.state.ragloop.decoder.mode == "direct"  # straight to the engine, no lock
    assert engine.steps - steps1 < steps1 - steps0  # fewer decode steps: requests shared batches


def test_tiny_logprobs_match_the_policy(scripted_server, tiny_policy):
    c = client(scripted_server(tiny_policy))
    r = c.chat.completions.create(model="tiny", messages=MSG, temperature=0, max_tokens=6, logprobs=True)
    direct = tiny_policy.generate(MSG, GenerationConfig(greedy=True, max_new_tokens=6, logprobs=True))[0]
    assert [t.logprob for t in r.choices[0].logprobs.content] == pytest.approx(direct.logprobs, abs=1e-5)


def test_capture_round_trip_to_sft(scripted_server, tiny_policy, tmp_path):
    from ragloop.alignment.data import traces_to_sft_rows
    from ragloop.alignment.sft import SFTConfig, run_sft

    srv = scripted_server(tiny_policy, capture_dir=str(tmp_path / "cap"))
    c = client(srv)
    msgs = [{"role": "system", "content": "Be brief."}, *MSG]
    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8, n=1)
    list(c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8, stream=True))
    c.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0)
    traces = read_traces(tmp_path / "cap" / "traces.jsonl")
    assert len(traces) == 3
    t = traces[0]
    assert t.messages[-1].role == "assistant" and t.messages[-1].content == r.choices[0].message.content
    assert [m.role for m in t.messages] == ["system", "user", "assistant"]
    assert t.decoding["greedy"] is True and t.decoding["max_new_tokens"] == 8 and t.policy == "tiny"
    assert t.meta["token_ids"] and len(t.meta["logprobs"]) == len(t.meta["token_ids"]) == t.tokens_out
    assert tiny_policy.detokenize(t.meta["token_ids"]).startswith(t.answer)
    assert traces[1].answer == t.answer  # the stream captured the same greedy text
    assert traces[2].meta["prompt_style"] == "raw"
    rows, report = traces_to_sft_rows(traces)
    assert report.kept == 2 and rows[1].template == "raw"  # the streamed answer is the same row (deduplicated)
    from ragloop.models.local import LocalPolicy
    from ragloop.models.tiny import build_tiny_llama

    fresh = LocalPolicy.from_model(build_tiny_llama(tiny_policy.tokenizer, layers=2, hidden=64, seed=1),
                                   tiny_policy.tokenizer, name="tiny", backend="hf")
    res = run_sft(SFTConfig(out_dir=str(tmp_path / "sft"), method="full", max_steps=2, batch_size=2), fresh, rows)
    assert res.steps == 2

