"""Encoder-decoder policies on a tiny random-weight T5 built locally over the real SmolLM2 tokenizer (no hub):
model families, span corruption on literal inputs, decoding (greedy, sampling, stop, n, logprobs, streaming,
batching), loading from a directory, the LangChain adapter, and clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ragloop.core.errors import ModelLoadError, UsageError
from ragloop.models.seq2seq import (
    Seq2SeqPolicy,
    model_family,
    random_spans,
    read_model_family,
    span_corrupt,
    span_corrupt_words,
)
from ragloop.models.types import GenerationConfig, GrammarSpec

GREEDY = GenerationConfig(greedy=True, max_new_tokens=10, logprobs=True)


@pytest.fixture(scope="module")
def t5_policy(smol_tokenizer):
    from ragloop.models.tiny import build_tiny_t5

    return Seq2SeqPolicy.from_model(build_tiny_t5(smol_tokenizer, seed=0), smol_tokenizer, name="tiny-t5")


# ------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("config, family", [
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_type": "bart", "is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "decoder-only"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "decoder-only"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, "encoder-only"),
    ({"model_type": "bert", "architectures": ["BertLMHeadModel"]}, "encoder-only"),
    ({"model_type": "roberta", "architectures": ["RobertaForSequenceClassification"]}, "encoder-only"),
    ({}, "decoder-only"),
])
def test_model_family_literals(config, family):
    assert model_family(config) == family


def test_read_model_family(tmp_path):
    assert read_model_family(tmp_path) == "decoder-only"  # no config.json (a GGUF directory)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    assert read_model_family(tmp_path) == "encoder-decoder"
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        read_model_family(tmp_path)


# ------------------------------------------------------------------------------------- span corruption


def test_span_corrupt_words_is_the_t5_paper_example():
    words = "Thank you for inviting me to your party last week .".split()
    inp, tgt = span_corrupt_words(words, [(2, 4), (8, 9)])
    assert inp == "Thank you <extra_id_0> me to your party <extra_id_1> week ."
    assert tgt == "<extra_id_0> for inviting <extra_id_1> last <extra_id_2>"


def test_span_corrupt_words_edges_and_errors():
    assert span_corrupt_words(["a", "b", "c"], [(0, 1)]) == ("<extra_id_0> b c", "<extra_id_0> a <extra_id_1>")
    assert span_corrupt_words(["a", "b"], [(1, 2)], sentinel="<X{}>") == ("a <X0>", "<X0> b <X1>")
    for bad in ([(1, 1)], [(0, 2), (1, 3)], [(2, 5)]):
        with pytest.raises(ValueError, match="spans"):
            span_corrupt_words(["a", "b", "c"], bad)


def _reconstruct(inp: str, tgt: str) -> str:
    """Fill each sentinel of the input with the words the target gives it (T5's objective inverted)."""
    fill, cur = {}, None
    for w in tgt.split():
        if w.startswith("<extra_id_"):
            cur = w
            fill[cur] = []
        else:
            fill[cur].append(w)
    return " ".join(x for w in inp.split() for x in (fill[w] if w in fill else [w]))


def test_span_corrupt_literal_seeded_and_invertible():
    text = "Thank you for inviting me to your party last week."
    assert span_corrupt(text, seed=0) == ("Thank you for inviting me to your party <extra_id_0>",
                                          "<extra_id_0> last week. <extra_id_1>")
    assert span_corrupt(text, seed=0) == span_corrupt(text, seed=0)
    long = " ".join(f"w{i}" for i in range(200))
    for seed in range(5):
        inp, tgt = span_corrupt(long, seed=seed)
        assert _reconstruct(inp, tgt) == long
        hidden = sum(1 for w in tgt.split() if not w.startswith("<extra_id_"))
        assert hidden == 30  # round(200 · 0.15)
        assert tgt.count("<extra_id_") == round(30 / 3) + 1  # 10 spans + the closing sentinel


def test_random_spans_counts():
    spans = random_spans(100, noise_density=0.2, mean_span_length=4, rng=random.Random(1))
    assert len(spans) == 5 and sum(e - s for s, e in spans) == 20
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # disjoint, never adjacent


def test_span_corrupt_rejects_bad_input():
    with pytest.raises(ValueError, match="two words"):
        span_corrupt("word")
    with pytest.raises(ValueError, match="noise_density"):
        span_corrupt("a b c", noise_density=1.5)


# --------------------------------------------------------------------------------------------- decoding


def test_is_a_policy_and_says_its_family(t5_policy):
    from ragloop.models.types import Policy

    assert isinstance(t5_policy, Policy) and t5_policy.family == "encoder-decoder"
    assert t5_policy.context_window == 512


def test_greedy_is_deterministic_and_batched_equals_single(t5_policy):
    prompts = ["Hello there", "A much longer prompt, so that the first one is padded in the batch"]
    batch = t5_policy.generate_batch(prompts, GREEDY)
    for p, got in zip(prompts, batch, strict=True):
        single = t5_policy.generate(p, GREEDY)[0]
        assert got[0].token_ids == single.token_ids and got[0].text == single.text
        assert got[0].logprobs == pytest.approx(single.logprobs, abs=1e-4)
    assert batch[0][0].num_tokens == 10 and batch[0][0].finish_reason == "length"
    assert batch[0][0].prompt_tokens == len(t5_policy.encode(prompts[0]))


def test_logprobs_equal_teacher_forced_score(t5_policy):
    g = t5_policy.generate("Hello there", GREEDY)[0]
    assert g.logprobs == pytest.approx(t5_policy.score("Hello there", g.text), abs=1e-4)
    assert all(lp <= 0 for lp in g.logprobs) and min(g.logprobs) < -0.01  # a real distribution, not one-hot


def test_stream_concatenates_to_generate(t5_policy):
    cfg = GenerationConfig(temperature=0.9, top_p=0.9, seed=5, max_new_tokens=12)
    streamed = "".join(t5_policy.stream([{"role": "user", "content": "Hi"}], cfg))
    assert streamed == t5_policy.generate([{"role": "user", "content": "Hi"}], cfg)[0].text and streamed


def test_sampling_settings_seed_and_n(t5_policy):
    cfg = GenerationConfig(temperature=1.5, top_k=50, seed=7, n=4, max_new_tokens=8)
    a, b = t5_policy.generate("Name a color.", cfg), t5_policy.generate("Name a color.", cfg)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] and len(a) == 4
    assert len({tuple(g.token_ids) for g in a}) > 1  # candidates differ
    top1 = t5_policy.generate("Name a color.", GenerationConfig(top_k=1, seed=1, max_new_tokens=8))[0]
    assert top1.token_ids == t5_policy.generate("Name a color.", GenerationConfig(greedy=True, max_new_tokens=8))[0].token_ids


def test_stop_string_cuts_the_text(t5_policy):
    full = t5_policy.generate("Hello there", GREEDY)[0].text
    stop = full[4:7]
    cut = t5_policy.generate("Hello there", GenerationConfig(greedy=True, max_new_tokens=10, stop=[stop]))[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_clear_errors(t5_policy):
    with pytest.raises(UsageError, match="grammar"):
        t5_policy.generate("Hi", GenerationConfig(grammar=GrammarSpec(kind="regex", source="[0-9]+")))
    with pytest.raises(UsageError, match="context window"):
        t5_policy.generate("Hi", GenerationConfig(max_new_tokens=600))
    with pytest.raises(UsageError, match="empty"):
        t5_policy.generate("  ")
    with pytest.raises(UsageError, match="PPO"):
        t5_policy.logprobs_of(torch.zeros((1, 2), dtype=torch.long))
    with pytest.raises(UsageError, match="one candidate"):
        list(t5_policy.stream("Hi", GenerationConfig(n=2)))


# ------------------------------------------------------------------------------------ loading and adapters


def test_load_policy_reads_an_encoder_decoder_directory(tmp_path, t5_policy):
    from ragloop.models.loading import load_policy, write_model_dir

    d = write_model_dir(t5_policy.model, t5_policy.tokenizer, tmp_path / "tiny-t5")
    loaded = load_policy(d)
    assert isinstance(loaded, Seq2SeqPolicy) and loaded.name == "tiny-t5"
    assert loaded.generate("Hello there", GREEDY)[0].token_ids == t5_policy.generate("Hello there", GREEDY)[0].token_ids
    with pytest.raises(UsageError, match="encoder-decoder"):
        load_policy(d, precision="int8")


def test_load_policy_refuses_an_encoder_only_directory(tmp_path):
    from ragloop.models.loading import load_policy

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="encoder-only"):
        load_policy(tmp_path)


def test_langchain_adapter_over_a_seq2seq_policy(t5_policy):
    from langchain_core.messages import HumanMessage

    from ragloop.models.langchain_chat import PolicyChatModel

    chat = PolicyChatModel(policy=t5_policy, greedy=True, max_new_tokens=8)
    out = chat.invoke([HumanMessage(content="Hi")])
    direct = t5_policy.generate([{"role": "user", "content": "Hi"}], GenerationConfig(greedy=True, max_new_tokens=8))[0]
    assert out.content == direct.text
    assert "".join(c.content for c in chat.stream([HumanMessage(content="Hi")])) == direct.text
