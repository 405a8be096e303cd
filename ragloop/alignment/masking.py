"""Tokenise chat rows for training, with the loss only on the model's own tokens.

A row is rendered with the policy's chat template — the one renderer used at inference, so the model trains
on exactly the format it runs on — and tokenised once with character offsets. Labels are the token ids on
trainable assistant turns (the content and the end-of-turn token that follows it, so the model learns to
stop) and ``-100`` everywhere else: system text, the user's question, observations, tool output and
retrieved passages never enter the loss (the masking of Ouyang et al. 2022 and every SFT recipe since).

The span of assistant turn ``i`` is found by rendering prefixes: ``render(messages[:i], gen_prompt=True)``
ends where the turn's content starts. A template whose renderings are not prefixes of each other is
refused with a DataError rather than guessed at. A row longer than ``max_length`` tokens is first fitted
by ``drop_exemplar_blocks`` — whole in-context exemplars are removed from its context messages (agent
prompts carry up to 8 of them: 1.2k-9.9k tokens) — and dropped and counted only if it still does not fit;
the model's own (trainable) text is never cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ragloop.alignment.data import DropReport, SFTRow
from ragloop.core.errors import DataError
from ragloop.core.trace import Message

IGNORE_INDEX = -100

# render(messages, add_generation_prompt) -> text; LocalPolicy.render has this shape.
Renderer = Callable[..., str]


@dataclass
class TokenizedExample:
    """One training sequence: token ids and labels of the same length (``-100`` = not in the loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _as_dicts(messages: Sequence[Message | dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append({"role": m.role, "content": m.content, "trainable": m.trainable})
        else:
            out.append({"role": m["role"], "content": m["content"], "trainable": m.get("trainable", True)})
    return out


def _render(render: Renderer, msgs: list[dict[str, Any]], gen: bool) -> str:
    return render([{"role": m["role"], "content": m["content"]} for m in msgs], add_generation_prompt=gen)


def trainable_char_spans(
    messages: Sequence[Message | dict[str, Any]], render: Renderer, *, eos_text: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of its trainable assistant turns.

    A span covers the turn's content plus ``eos_text`` when the template writes it right after the content
    (e.g. ``<|im_end|>``); the template's trailing newline is not trained. With a ChatML template::

        text  = "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nyo<|im_end|>\\n"
        spans = [(len(text) - 13, len(text) - 1)]   # "yo<|im_end|>"
    """
    msgs = _as_dicts(messages)
    full = _render(render, msgs, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not m["trainable"]:
            continue
        if i == 0:
            raise DataError("a conversation starts with an assistant turn; it needs a prompt before it")
        before = _render(render, msgs[:i], True)
        upto = _render(render, msgs[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                "the chat template does not render conversations as prefixes of each other; "
                "cannot locate assistant turns for masking",
                hint="use a policy whose chat template is prefix-stable (ChatML-style)",
            )
        turn = upto[len(before):]
        content = m["content"]
        # ChatML-style templates put the content right after the generation prompt; others are searched.
        start = 0 if turn.startswith(content) else (turn.find(content) if content else -1)
        if start < 0:
            raise DataError(f"the chat template changed the text of assistant turn {i}; cannot mask it")
        end = start + len(content)
        if eos_text and turn[end:].startswith(eos_text):
            end += len(eos_text)
        spans.append((len(before) + start, len(before) + end))
    return full, spans


def tokenize_raw(
    messages: Sequence[Message | dict[str, Any]], tokenizer: Any, *, max_length: int | None = None
) -> TokenizedExample:
    """A plain-completion row (no chat template): each message's text tokenised on its own and concatenated,
    exactly as the model saw it (prompt ids, then the generated ids after them). Trainable assistant text is
    labelled, and when the row ends with one the end-of-sequence token is appended and labelled too, so the
    model learns to stop::

        [user "Q: 2+2?\n", assistant "return 4"] → ids(Q…) + ids(return 4) + [eos], labels −100… + ids + [eos]
    """
    msgs = _as_dicts(messages)
    ids: list[int] = []
    labels: list[int] = []
    for m in msgs:
        t = list(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
        train = m["role"] == "assistant" and m["trainable"]
        ids += t
        labels += t if train else [IGNORE_INDEX] * len(t)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if msgs and msgs[-1]["role"] == "assistant" and msgs[-1]["trainable"] and eos_id is not None:
        ids.append(int(eos_id))
        labels.append(int(eos_id))
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"row is {len(ids)} tokens, longer than max_length={max_length}")
    ex = TokenizedExample(input_ids=ids, labels=labels)
    if ex.n_trainable == 0:
        raise DataError("row has no trainable tokens after tokenisation")
    return ex


def tokenize_chat(
    messages: Sequence[Message | dict[str, Any]],
    render: Renderer,
    tokenizer: Any,
    *,
    max_length: int | None = None,
) -> TokenizedExample:
    """Render and tokenise one conversation; labels copy ``input_ids`` on trainable spans, else ``-100``.

    A token is trainable when it starts inside a trainable span. Raises DataError if the sequence is longer
    than ``max_length`` (the caller decides whether to drop the row) or nothing is trainable.
    """
    eos = getattr(tokenizer, "eos_token", None)
    text, spans = trainable_char_spans(messages, render, eos_text=eos)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"row is {len(ids)} tokens, longer than max_length={max_length}")
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1] and e > s:
            labels[t] = ids[t]
    ex = TokenizedExample(input_ids=ids, labels=labels)
    if ex.n_trainable == 0:
        raise DataError("row has no trainable tokens after tokenisation")
    return ex


# An exemplar starts at a line beginning with one of the task prefixes the agents' prompts use (PAL/CoT
# "Q:", ReAct "Question:"/"Claim:"); a "Context:" line starts the retrieved context of the final question.
_EXEMPLAR_START = re.compile(r"^(?:Q|Question|Claim|Context):", re.M)


def _exemplar_blocks(text: str, *, is_prompt: bool) -> list[tuple[int, int]]:
    """Character spans of the droppable exemplar blocks in one context message: every block from a task-prefix
    line to the next. When the message is the prompt the model answered (``is_prompt``), its final question
    (the last block, with a ``Context:`` block right before it) is kept::

        _exemplar_blocks("Head\nQ: a\nA1\nQ: b\n", is_prompt=True) -> [(5, 13)]     # "Q: a\nA1\n"
    """
    starts = [m.start() for m in _EXEMPLAR_START.finditer(text)]
    if not starts:
        return []
    blocks = list(zip(starts, [*starts[1:], len(text)], strict=True))  # (start, end) of each block
    if is_prompt and blocks:
        blocks.pop()  # the question itself
        if blocks and text.startswith("Context:", blocks[-1][0]):
            blocks.pop()
    return [b for b in blocks if not text.startswith("Context:", b[0])]


def drop_exemplar_blocks(messages: Sequence[Message], n: int) -> list[Message] | None:
    """The messages with the first ``n`` droppable exemplar blocks removed from the context messages before
    the model's first turn (most relevant exemplars come first in a similarity-chosen set, but any whole exemplar is an
    equally valid context; the instruction head and the final question stay). None when fewer than ``n``
    exist. Trainable assistant text is never touched."""
    out = list(messages)
    left = n
    for i, m in enumerate(messages):
        if left == 0 or m.role == "assistant":
            break  # only the prompt before the model's first turn; later context (observations) is evidence
        is_prompt = i + 1 < len(messages) and messages[i + 1].role == "assistant"
        blocks = _exemplar_blocks(m.content, is_prompt=is_prompt)[:left]
        if not blocks:
            continue
        text, cut = m.content, 0
        for s, e in blocks:
            text = text[: s - cut] + text[e - cut:]
            cut += e - s
        out[i] = m.model_copy(update={"content": text})
        left -= len(blocks)
    return out if left == 0 else None


def _tokenize_row(row: SFTRow, render: Renderer, tokenizer: Any, max_length: int) -> tuple[TokenizedExample, int]:
    """Tokenise one row, dropping whole exemplars from its context until it fits ``max_length``; returns the
    example and how many exemplars were dropped. Raises DataError when even no exemplars do not fit."""

    def tok(msgs: Sequence[Message]) -> TokenizedExample:
        if row.template == "raw":
            return tokenize_raw(msgs, tokenizer, max_length=max_length)
        return tokenize_chat(msgs, render, tokenizer, max_length=max_length)

    try:
        return tok(row.messages), 0
    except DataError as e:
        if "longer than max_length" not in str(e):
            raise
        first = e
    n = 1
    while (msgs := drop_exemplar_blocks(row.messages, n)) is not None:
        try:
            return tok(msgs), n
        except DataError as e:
            if "longer than max_length" not in str(e):
                raise
        n += 1
    raise first


def tokenize_rows(
    rows: Sequence[SFTRow], render: Renderer, tokenizer: Any, *, max_length: int
) -> tuple[list[TokenizedExample], DropReport]:
    """Tokenise many rows. A row over ``max_length`` loses whole context exemplars until it fits (counted in
    ``report.fitted``); rows still too long or with nothing to learn are dropped and counted."""
    report = DropReport()
    out: list[TokenizedExample] = []
    for row in rows:
        report.read += 1
        try:
            ex, n_dropped = _tokenize_row(row, render, tokenizer, max_length)
        except DataError as e:
            report.drop("too_long" if "longer than max_length" in str(e) else "unmaskable")
            continue
        out.append(ex)
        report.kept += 1
        if n_dropped:
            report.fitted += 1
    return out, report


def pad_batch(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch: ``input_ids`` (B, T), ``labels`` (B, T) with -100 on padding, ``attention_mask``."""
    import torch

    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attn = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        attn[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attn}
