"""LangChain's own standard test suites (``langchain-tests``) run against ``PolicyChatModel``.

Capabilities are claimed truthfully: tool calling, tool choice and structured output are claimed (they are
enforced by a JSON-schema grammar on the decode); images, audio, PDFs, JSON mode without a schema and
Anthropic-format inputs are not. The model is a scripted policy that behaves like a small instruction
model under a grammar-constrained decoder (``rule_based_model``): it answers questions with text, fills a
required schema with values it reads from the question, and calls an offered tool when asked to use one.
It tests the adapter — message conversion, tool plans and grammars, parsing, streaming, usage metadata,
settings — not a model's judgement. The real 135M model under the real grammar is checked by
``test_real_model_tool_call_and_structured_output`` below and by tests/serve/test_serve_cli.py.
"""

from __future__ import annotations

import json
import re

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from ragloop.models.langchain_chat import PolicyChatModel
from ragloop.models.scripted import ScriptedPolicy


def _last(text: str, role: str) -> str:
    parts = text.split(f"<|im_start|>{role}\n")
    return parts[-1].split("<|im_end|>")[0] if len(parts) > 1 else ""


def _fill(schema: dict, question: str) -> object:
    """A value of ``schema`` built from the question: quoted text or the question for strings, its first
    integer for numbers (what a constrained decoder lets a model write)."""
    if "anyOf" in schema:
        return _fill(schema["anyOf"][0], question)
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object":
        required = schema.get("required", list(schema.get("properties", {})))
        return {k: _fill(v, question) for k, v in schema.get("properties", {}).items() if k in required}
    if kind in ("integer", "number"):
        m = re.search(r"-?\d+", question)
        return int(m.group()) if m else 0
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    quoted = re.search(r"'([^']+)'", question)
    return quoted.group(1) if quoted else question.strip()[:60] or "answer"


def rule_based_model(text: str, cfg) -> str:
    question = _last(text, "user")
    after_tool = text.rfind("<|im_start|>tool\n") > text.rfind("<|im_start|>user\n")
    if cfg.grammar is not None:
        return json.dumps(_fill(json.loads(cfg.grammar.source), question), ensure_ascii=False)
    if "You can call these tools" in text and not after_tool:
        tools = re.findall(r"^- (\w+)(?::[^\n]*)? Arguments \(JSON schema\): (.*)$", _last(text, "system"), re.M)
        wanted = [t for t in tools if t[0] in question] or tools
        if wanted and ("tool" in question.lower() or "weather" in question.lower() or wanted != tools):
            name, params = wanted[0]
            return json.dumps({"name": name, "arguments": _fill(json.loads(params), question)}, ensure_ascii=False)
    if after_tool:
        return "The tool says: " + _last(text, "tool")
    return "Hello! I am a small model, happy to help."


def _params() -> dict:
    return {"policy": ScriptedPolicy(rule_based_model, name="rule-based"), "model": "rule-based", "temperature": 0}


class TestPolicyChatModelUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[PolicyChatModel]:
        return PolicyChatModel

    @property
    def chat_model_params(self) -> dict:
        return _params()

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestPolicyChatModelIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[PolicyChatModel]:
        return PolicyChatModel

    @property
    def chat_model_params(self) -> dict:
        return _params()

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return False  # schema-free JSON mode would need the model to pick the keys from the prose

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False


# -- what the suites found broken, on the tiny real-decoder model ------------------------------------------

MSGS = [("system", "Be brief."), ("human", "Name a color.")]


@pytest.fixture(scope="module")
def tiny():
    from ragloop.models.loading import load_tokenizer
    from ragloop.models.local import LocalPolicy
    from ragloop.models.tiny import build_tiny_llama

    tok = load_tokenizer()
    return LocalPolicy.from_model(build_tiny_llama(tok, layers=2, hidden=64, seed=0), tok, name="tiny", backend="hf")


def test_max_tokens_is_honoured(tiny):
    chat = PolicyChatModel(policy=tiny, greedy=True, max_tokens=5)
    assert chat.invoke(MSGS).usage_metadata["output_tokens"] == 5
    assert PolicyChatModel(policy=tiny, greedy=True).invoke(MSGS, max_tokens=3).usage_metadata["output_tokens"] == 3


def test_stream_ends_with_usage_and_model_name(tiny):
    chat = PolicyChatModel(policy=tiny, greedy=True, max_tokens=8)
    chunks = list(chat.stream(MSGS))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == chat.invoke(MSGS).content
    assert full.usage_metadata["output_tokens"] == 8 and full.usage_metadata["input_tokens"] > 0
    assert full.response_metadata["model_name"] == "tiny" and full.response_metadata["finish_reason"] == "length"


def test_ls_params_name_the_model(tiny):
    params = PolicyChatModel(policy=tiny, temperature=0.3, max_tokens=7)._get_ls_params(stop=["x"])
    assert params["ls_model_name"] == "tiny" and params["ls_provider"] == "ragloop"
    assert params["ls_max_tokens"] == 7 and params["ls_temperature"] == 0.3 and params["ls_stop"] == ["x"]


def test_timeout_stops_a_local_decode(tiny):
    chat = PolicyChatModel(policy=tiny, greedy=True, max_tokens=200, timeout=1e-9)
    with pytest.raises(TimeoutError, match="timeout"):
        chat.invoke(MSGS)
    with pytest.raises(TimeoutError):
        list(chat.stream(MSGS))


def test_timeout_and_retries_reach_a_remote_client():
    from ragloop.models.openai import OpenAIPolicy

    remote = OpenAIPolicy("m", "http://127.0.0.1:9/v1")
    chat = PolicyChatModel(policy=remote, timeout=3.5, max_retries=0)
    p = chat._policy_for_call({})
    assert p.client.timeout == 3.5 and p.client.max_retries == 0 and remote.client.max_retries != 0


@pytest.mark.e2e
def test_real_model_tool_call_and_structured_output():
    """The suites' tool-calling and structured-output cases on the real 135M model: the grammar makes the
    required call and the schema's JSON valid (the values are the model's own)."""
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    from ragloop.models.loading import load_policy

    @tool
    def magic_function(input: int) -> int:
        """Apply a magic function to an input."""
        return input + 2

    class Joke(BaseModel):
        """Joke to tell user."""

        setup: str = Field(description="question to set up a joke")
        punchline: str = Field(description="answer to resolve the joke")

    chat = PolicyChatModel(policy=load_policy(precision="fp32"), greedy=True, max_tokens=60)
    msg = chat.bind_tools([magic_function], tool_choice="any").invoke(
        "What is the value of magic_function(3)? Use the tool.")
    assert [c["name"] for c in msg.tool_calls] == ["magic_function"]
    assert isinstance(msg.tool_calls[0]["args"]["input"], int)
    # greedy, the 135M model repeats itself inside the punchline string until max_tokens runs out (the grammar
    # keeps every prefix valid but cannot make the model close the string); a repetition penalty lets it finish
    chat = PolicyChatModel(policy=chat.policy, greedy=True, max_tokens=120, repetition_penalty=1.3)
    joke = chat.with_structured_output(Joke).invoke("Tell me a joke about cats")
    assert isinstance(joke, Joke) and joke.setup and joke.punchline
