"""Fixtures for the server tests: real uvicorn servers on 127.0.0.1 over a scripted or a tiny policy."""

from __future__ import annotations

import json

import pytest

from ragloop.models.scripted import ScriptedPolicy
from ragloop.retrieval.embeddings import HashingEmbedder
from ragloop.serve import ServeConfig, ServerThread, create_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def fill_schema(schema: dict):
    """A value matching a simple JSON schema (what a grammar-constrained decoder could emit): a tool call's
    ``{"name": const, "arguments": ...}``, strings "4" (city: "Paris"), numbers 4."""
    if "anyOf" in schema:
        return fill_schema(schema["anyOf"][0])
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object":
        return {k: ("Paris" if k == "city" else fill_schema(v)) for k, v in schema.get("properties", {}).items()}
    return {"string": "4", "integer": 4, "number": 4, "boolean": True, "array": []}.get(kind, "4")


def scripted_responder(text: str, cfg) -> str:
    """A fake model that obeys its grammar the way a constrained decoder would: a required call to
    get_weather gets a call, a JSON schema gets an object, anything else a sentence."""
    if cfg.grammar is not None:
        return json.dumps(fill_schema(json.loads(cfg.grammar.source)))
    if "You can call these tools" in text and "weather" in text.split("<|im_start|>user")[-1]:
        return '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    return "Hello there, friend."


@pytest.fixture
def scripted_server():
    """Start a server over a scripted policy; yields a function (config kwargs -> running ServerThread)."""
    started = []

    def make(policy=None, **cfg):
        pol = policy or ScriptedPolicy(scripted_responder, name="scripted")
        cfg.setdefault("embedder_factory", lambda: HashingEmbedder(64))
        srv = ServerThread(create_app(pol, ServeConfig(**cfg))).start()
        started.append(srv)
        return srv

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def smol_tokenizer():
    from ragloop.models.loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_policy(smol_tokenizer):
    from ragloop.models.local import LocalPolicy
    from ragloop.models.tiny import build_tiny_llama

    model = build_tiny_llama(smol_tokenizer, layers=2, hidden=64, heads=4, kv_heads=2, seed=0)
    return LocalPolicy.from_model(model, smol_tokenizer, name="tiny", backend="hf")
