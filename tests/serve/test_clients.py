"""Clients against ``ragloop serve`` over real HTTP: ragloop's own ``OpenAIPolicy`` (``--policy openai:...``)
and LangChain's ``ChatOpenAI`` / ``OpenAIEmbeddings``."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from ragloop.core.errors import ModelLoadError, ModelNotFoundError, UsageError
from ragloop.models.loading import load_policy
from ragloop.models.openai import parse_openai_spec
from ragloop.models.types import GenerationConfig
from ragloop.retrieval.embeddings import HashingEmbedder
from tests.serve.conftest import WEATHER

MSG = [{"role": "user", "content": "Say hello."}]


def test_parse_spec(monkeypatch):
    assert parse_openai_spec("openai:org/m@x@http://h:1/v1/") == ("org/m@x", "http://h:1/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert parse_openai_spec("openai:m") == ("m", "http://127.0.0.1:9/v1")
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(UsageError, match="no server URL"):
        parse_openai_spec("openai:m")


def test_openai_policy_against_ragloop_serve(scripted_server, tiny_policy):
    srv = scripted_server(tiny_policy)
    remote = load_policy(f"openai:tiny@{srv.base_url}")
    assert remote.context_window == tiny_policy.context_window
    cfg = GenerationConfig(greedy=True, max_new_tokens=10, logprobs=True)
    got, want = remote.generate(MSG, cfg)[0], tiny_policy.generate(MSG, cfg)[0]
    assert got.text == want.text and got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5) and got.prompt_tokens == want.prompt_tokens
    # raw prompts (what ReAct / PAL send after rendering) go to /v1/completions
    raw = remote.render(MSG) + "Sure"
    assert raw == tiny_policy.render(MSG) + "Sure"
    batch = remote.generate_batch([raw, "Once upon a time"], GenerationConfig(greedy=True, max_new_tokens=6))
    assert [b[0].text for b in batch] == [b[0].text for b in tiny_policy.generate_batch(
        [raw, "Once upon a time"], GenerationConfig(greedy=True, max_new_tokens=6))]
    assert "".join(remote.stream(MSG, GenerationConfig(greedy=True, max_new_tokens=10))) == want.text
    assert remote.tokenize("hello world") == tiny_policy.tokenize("hello world")
    assert remote.detokenize(remote.tokenize("hello world")) == "hello world"
    assert remote.count_tokens(MSG) == tiny_policy.count_tokens(MSG)
    # scoring (the RLAIF / CAI judge) through echo + logprobs
    got = remote.score("The capital of France is", " Paris. It is big.")
    assert got == pytest.approx(tiny_policy.score("The capital of France is", " Paris. It is big."), abs=1e-4)
    assert len(got) == len(tiny_policy.tokenize(" Paris. It is big."))


def test_openai_policy_errors(scripted_server):
    srv = scripted_server()
    with pytest.raises(ModelNotFoundError, match="not served"):
        load_policy(f"openai:gpt-4@{srv.base_url}").generate("hi")
    with pytest.raises(ModelLoadError, match="unreachable"):
        from ragloop.models.openai import OpenAIPolicy

        OpenAIPolicy("m", "http://127.0.0.1:9/v1", max_retries=0, timeout=5).generate("hi")
    with pytest.raises(UsageError, match="training needs local weights"):
        _ = load_policy(f"openai:scripted@{srv.base_url}").model
    with pytest.raises(UsageError, match="echo"):  # a scripted policy has no prompt logprobs: scoring says so
        load_policy(f"openai:scripted@{srv.base_url}").score("a", "b")
    with pytest.raises(UsageError, match="answered 400: .*context window"):  # a 4xx carries the server's message
        load_policy(f"openai:scripted@{srv.base_url}").generate("hi", GenerationConfig(max_new_tokens=100_000))
    with pytest.raises(UsageError, match="is a server"):
        load_policy(f"openai:scripted@{srv.base_url}", precision="int4")


def test_train_command_refuses_a_server(scripted_server, tmp_path):
    from ragloop.cli import app

    srv = scripted_server()
    traces = tmp_path / "t.jsonl"
    traces.write_text('{"question": "q", "messages": [{"role": "user", "content": "q"}, '
                      '{"role": "assistant", "content": "a"}], "finished": true, "answer": "a"}\n')
    res = CliRunner().invoke(app, ["train", "sft", "--traces", str(traces), "--all-traces", "--out",
                                   str(tmp_path / "o"), "--policy", f"openai:scripted@{srv.base_url}"])
    assert isinstance(res.exception, UsageError) and "training needs local weights" in str(res.exception)


def test_langchain_chat_openai(scripted_server):
    from langchain_openai import ChatOpenAI

    srv = scripted_server()
    llm = ChatOpenAI(model="scripted", base_url=srv.base_url, api_key="-", max_retries=0, temperature=0)
    out = llm.invoke("Say hello.")
    assert out.content == "Hello there, friend." and out.usage_metadata["output_tokens"] == 7
    assert "".join(c.content for c in llm.stream("Say hello.")) == "Hello there, friend."
    call = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?").tool_calls[0]
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    full = None
    for chunk in llm.bind_tools([WEATHER], tool_choice="required").stream("Weather in Paris?"):
        full = chunk if full is None else full + chunk
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "Paris"})]
    from pydantic import BaseModel

    class Answer(BaseModel):
        answer: str

    assert llm.with_structured_output(Answer, method="json_schema").invoke("2+2?") == Answer(answer="4")
    assert llm.with_structured_output(Answer, method="function_calling").invoke("2+2?") == Answer(answer="4")


def test_langchain_openai_embeddings(scripted_server):
    from langchain_openai import OpenAIEmbeddings

    srv = scripted_server()
    # check_embedding_ctx_length=False: LangChain would otherwise fetch a tiktoken vocabulary from the network
    emb = OpenAIEmbeddings(model="hashing-64", base_url=srv.base_url, api_key="-", check_embedding_ctx_length=False)
    got = np.array(emb.embed_documents(["a red apple", "blue sky"]))
    assert np.allclose(got, HashingEmbedder(64).embed_documents(["a red apple", "blue sky"]), atol=1e-6)
    assert np.allclose(emb.embed_query("blue sky"), got[1], atol=1e-6)


@pytest.mark.parametrize("agent", ["cot", "pal", "react"])
def test_agents_run_unchanged_over_a_server(scripted_server, agent, ragloop_home):
    """``ragloop ask --policy openai:...``: every agent, including those that render the chat template and
    prefill it (PAL, ReAct), runs over HTTP."""
    from ragloop.cli import main
    from ragloop.models.scripted import ScriptedPolicy

    answers = {"cot": "2 plus 3 is 5. The answer is 5.", "pal": "    return 2 + 3\n",
               "react": " I know this.\nAction 1: Finish[5]"}
    srv = scripted_server(ScriptedPolicy(lambda text, cfg: answers[agent], name="scripted"))
    assert main(["ask", "What is 2+3?", "--agent", agent, "--policy", f"openai:scripted@{srv.base_url}"]) == 0


def test_serve_proxies_another_server(scripted_server):
    """``ragloop serve --policy openai:...``: a server over an OpenAIPolicy (thread-safe: no worker queue)."""
    import openai

    upstream = scripted_server()
    proxy = scripted_server(load_policy(f"openai:scripted@{upstream.base_url}"))
    assert proxy.server.config.app.state.ragloop.decoder.mode == "direct"
    c = openai.OpenAI(base_url=proxy.base_url, api_key="-", max_retries=0)
    r = c.chat.completions.create(model="openai:scripted", messages=MSG, n=2)
    assert [ch.message.content for ch in r.choices] == ["Hello there, friend."] * 2
    assert r.usage.prompt_tokens == upstream_tokens(upstream)


def upstream_tokens(srv) -> int:
    import httpx

    return httpx.post(f"{srv.url}/tokenize", json={"messages": MSG}).json()["count"]
