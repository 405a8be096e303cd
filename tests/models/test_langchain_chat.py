"""The LangChain chat-model adapter over the tiny local policy and the scripted policy."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from ragloop.core.errors import UsageError
from ragloop.models.langchain_chat import PolicyChatModel, to_chat_messages
from ragloop.models.types import GenerationConfig

MSGS = [SystemMessage(content="Be brief."), HumanMessage(content="Name a color.")]


def test_message_roles():
    msgs = to_chat_messages([*MSGS, AIMessage(content="Red."), HumanMessage(content=[{"type": "text", "text": "x"}])])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "x"


def test_invoke_matches_the_policy(tiny_policy):
    chat = PolicyChatModel(policy=tiny_policy, greedy=True, max_new_tokens=12)
    out = chat.invoke(MSGS)
    direct = tiny_policy.generate(to_chat_messages(MSGS), GenerationConfig(greedy=True, max_new_tokens=12))[0]
    assert out.content == direct.text
    assert out.usage_metadata["output_tokens"] == direct.num_tokens
    assert out.response_metadata["finish_reason"] == direct.finish_reason


def test_stream_concatenates_to_invoke(tiny_policy):
    chat = PolicyChatModel(policy=tiny_policy, temperature=0.8, seed=3, max_new_tokens=16)
    streamed = "".join(c.content for c in chat.stream(MSGS))
    assert streamed == chat.invoke(MSGS).content and streamed


def test_stop_and_per_call_settings(tiny_policy):
    chat = PolicyChatModel(policy=tiny_policy, greedy=True, max_new_tokens=30)
    full = chat.invoke(MSGS).content
    stop = full[5:8]
    assert chat.invoke(MSGS, stop=[stop]).content == full[: full.index(stop)]
    assert chat.invoke(MSGS, max_new_tokens=3).usage_metadata["output_tokens"] == 3


def test_scripted_policy_works_too():
    from ragloop.models.scripted import ScriptedPolicy

    chat = PolicyChatModel(policy=ScriptedPolicy(["Blue. Observation: x"]), stop=[" Observation"])
    assert chat.invoke(MSGS).content == "Blue."


def test_not_a_policy_is_refused():
    with pytest.raises((UsageError, ValueError)):
        PolicyChatModel(policy=object())
