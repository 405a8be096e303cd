"""Loss masking on the real SmolLM2 tokenizer and chat template: only trainable assistant tokens are labelled."""

from __future__ import annotations

import pytest

from ragloop.alignment.data import SFTRow
from ragloop.alignment.masking import (
    IGNORE_INDEX,
    pad_batch,
    tokenize_chat,
    tokenize_rows,
    trainable_char_spans,
)
from ragloop.core.errors import DataError
from ragloop.models.scripted import render_chatml


def _trained_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX])


def test_spans_on_literal_chatml():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text, spans = trainable_char_spans(msgs, render_chatml, eos_text="<|im_end|>")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert [text[s:e] for s, e in spans] == ["yo<|im_end|>"]


def test_masking_multi_turn(smol_tokenizer, chat_render):
    msgs = [
        {"role": "system", "content": "Solve with Python."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "def solution():\n    return 2 + 2"},
        {"role": "tool", "content": "Observation: 4 (retrieved text must not be learned)"},
        {"role": "assistant", "content": "Answer: 4", "trainable": False},  # repaired by the parser
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "def solution():\n    return 3 + 3"},
    ]
    ex = tokenize_chat(msgs, chat_render, smol_tokenizer)
    assert len(ex.input_ids) == len(ex.labels)
    assert _trained_text(smol_tokenizer, ex) == (
        "def solution():\n    return 2 + 2<|im_end|>def solution():\n    return 3 + 3<|im_end|>"
    )
    # the ids are those of the rendered text, tokenised as the policy tokenises it
    full = chat_render(msgs, add_generation_prompt=False)
    assert ex.input_ids == smol_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert "retrieved" not in _trained_text(smol_tokenizer, ex)


def test_too_long_and_untrainable_rows_dropped(smol_tokenizer, chat_render):
    good = SFTRow(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "short"}])
    long = SFTRow(messages=[{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "a"}])
    exs, rep = tokenize_rows([good, long], chat_render, smol_tokenizer, max_length=64)
    assert len(exs) == 1 and rep.dropped == {"too_long": 1}
    with pytest.raises(DataError, match="longer than max_length"):
        tokenize_chat(long.messages, chat_render, smol_tokenizer, max_length=64)
    with pytest.raises(DataError, match="starts with an assistant"):
        tokenize_chat([{"role": "assistant", "content": "x"}], chat_render, smol_tokenizer)


def test_pad_batch_shapes():
    from ragloop.alignment.masking import TokenizedExample

    b = pad_batch([TokenizedExample([1, 2, 3], [-100, 2, 3]), TokenizedExample([4], [4])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_raw_completion_rows(smol_tokenizer):
    """PAL's raw style: prompt and completion tokenised separately (as fed at inference), eos appended."""
    from ragloop.alignment.masking import tokenize_raw

    prompt = 'Q: 2+2?\n\n# solution in Python:\n\n\ndef solution():\n    """2+2?"""\n'
    body = "    result = 2 + 2\n    return result"
    ex = tokenize_raw([{"role": "user", "content": prompt}, {"role": "assistant", "content": body}], smol_tokenizer)
    p_ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    b_ids = smol_tokenizer(body, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p_ids + b_ids + [smol_tokenizer.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(p_ids) + b_ids + [smol_tokenizer.eos_token_id]
    row = SFTRow(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": body}], template="raw")
    exs, _ = tokenize_rows([row], None, smol_tokenizer, max_length=256)
    assert exs[0].input_ids == ex.input_ids
