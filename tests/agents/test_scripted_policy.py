"""The scripted policy behaves like a decoder where agents depend on it (stop, length, context window)."""

from __future__ import annotations

import pytest

from ragloop.core.errors import ContextWindowError, UsageError
from ragloop.models.scripted import ScriptedPolicy, cut_at_stop, split_tokens
from ragloop.models.types import GenerationConfig, Policy


def test_is_a_policy():
    assert isinstance(ScriptedPolicy(["x"]), Policy)


@pytest.mark.parametrize("text", ["", "a, b", "Thought 1: x\n\nAction 1: Search[y]", "ünï  cödé\t!"])
def test_tokenize_round_trip(text):
    p = ScriptedPolicy([])
    assert p.detokenize(p.tokenize(text)) == text
    assert "".join(split_tokens(text)) == text


def test_split_tokens_literal():
    assert split_tokens("a, b") == ["a", ",", " ", "b"]


def test_cut_at_stop_earliest():
    assert cut_at_stop("a\nObs b\nX", ["\nX", "\nObs"]) == ("a", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)


def test_stop_and_length_and_calls():
    p = ScriptedPolicy(["Thought 1: go\nAction 1: Finish[4]\nObservation 1: junk", "one two three four"])
    g = p.generate("Q?", GenerationConfig(stop=["\nObservation"]))[0]
    assert g.text == "Thought 1: go\nAction 1: Finish[4]" and g.finish_reason == "stop"
    g2 = p.generate([{"role": "user", "content": "hi"}], GenerationConfig(max_new_tokens=3))[0]
    assert g2.text == "one two" and g2.finish_reason == "length" and g2.num_tokens == 3
    assert p.prompts[0] == "Q?"
    assert p.prompts[1] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UsageError, match="ran out"):
        p.generate("again")


def test_n_candidates_consume_responses_and_callable():
    p = ScriptedPolicy(["a", "b", "c"])
    assert [g.text for g in p.generate("q", GenerationConfig(n=3))] == ["a", "b", "c"]
    seen = []
    q = ScriptedPolicy(lambda text, cfg: seen.append(text) or f"echo {len(text)}")
    assert q.generate("abc")[0].text == "echo 3" and seen == ["abc"]
    assert list(q.stream("abcd")) == ["echo", " ", "4"]


def test_context_window_error():
    p = ScriptedPolicy(["x"], context_window=10)
    with pytest.raises(ContextWindowError, match="exceeds"):
        p.generate("a b c d e f", GenerationConfig(max_new_tokens=5))


def test_score_deterministic():
    a = ScriptedPolicy([]).score("ctx", "some text")
    b = ScriptedPolicy([]).score("ctx", "some text")
    assert a == b and len(a) == 3 and all(-5 <= x < 0 for x in a)
    g = ScriptedPolicy(["some text"]).generate("ctx", GenerationConfig(logprobs=True))[0]
    assert g.logprobs == a
