"""End-to-end tests on the real embedded model (SmolLM2-135M-Instruct), loaded once through the normal cache.

The first run on a machine converts the GGUF into the cache (~25 s); later runs load the safetensors.
The module's policy uses the reference decode path; the fast path's agreement with it is tested with the
fast path itself, and the CLI test below runs the default (auto) path.
"""

from __future__ import annotations

import json

import pytest

from ragloop.models.types import GenerationConfig

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def policy():
    from ragloop.models.loading import load_policy

    return load_policy(backend="hf")


def test_loaded_from_the_converted_cache(policy):
    from ragloop.models.loading import converted_dir, resolve_spec, verify_model_dir

    manifest = verify_model_dir(converted_dir(resolve_spec(None)))
    assert manifest["params"] == 134_515_008 and manifest["context_window"] == 8192
    assert policy.name == "smollm2-135m-instruct" and policy.context_window == 8192
    assert policy.render(QUESTION).startswith("<|im_start|>system\n")
    assert policy.render(QUESTION).endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_answers_a_simple_question(policy):
    gen = policy.generate(QUESTION, GenerationConfig(greedy=True, max_new_tokens=16, logprobs=True))[0]
    assert gen.text.strip() and "4" in gen.text
    assert gen.finish_reason in ("eos", "length")
    assert len(gen.logprobs) == gen.num_tokens and all(lp <= 0 for lp in gen.logprobs)
    assert sum(policy.score(QUESTION, "2 + 2 = 4")) > sum(policy.score(QUESTION, "2 + 2 = banana"))


def test_stream_matches_generate(policy):
    cfg = GenerationConfig(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=1)
    pieces = list(policy.stream(QUESTION, cfg))
    assert len(pieces) > 1 and "".join(pieces) == policy.generate(QUESTION, cfg)[0].text


def test_batched_candidates_are_seeded(policy):
    cfg = GenerationConfig(temperature=1.0, top_k=50, max_new_tokens=6, seed=3, n=4)
    a = policy.generate([{"role": "user", "content": "Name a color."}], cfg)
    b = policy.generate([{"role": "user", "content": "Name a color."}], cfg)
    assert [g.text for g in a] == [g.text for g in b] and all(g.text.strip() for g in a)


@pytest.mark.parametrize("text", ["De-tokenization is lossless, isn't it?", "naïve café 🎉 日本語\n\tx = 2**10"])
def test_tokens_round_trip(policy, text):
    ids = policy.tokenize(text)
    assert ids and policy.detokenize(ids) == text and policy.count_tokens(text) == len(ids)


def test_cli_generate_on_the_real_model(capsys):
    from ragloop.cli import main

    rc = main(["generate", "What is 2+2?", "--greedy", "--max-tokens", "16", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    cand = json.loads(out)["candidates"][0]
    assert "4" in cand["text"]
