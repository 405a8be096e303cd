"""SFT data and loss for encoder-decoder policies: the encoder reads the context, the loss is on the target only.

A chat row becomes one example per trainable assistant turn: the encoder input is the conversation before
that turn, rendered with the policy's chat template and the generation prompt (exactly what
``Seq2SeqPolicy.encode`` feeds at inference), and the target is the turn's text followed by the EOS token
(so the decoder learns to stop). A ``raw`` row (plain completion) uses the messages before the turn
concatenated as they are — e.g. a span-corruption pair ``(input, target)`` from ``seq2seq.span_corrupt``.
Nothing on the encoder side is ever in the loss: masking the prompt, which a decoder-only model needs
(``masking``), holds by construction here (Raffel et al. 2020 train T5 the same way).

The loss is the summed token NLL of the targets under teacher forcing: the decoder reads
``[start] + target[:-1]`` (transformers shifts the labels right) and predicts ``target``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragloop.alignment.data import DropReport, SFTRow
from ragloop.alignment.masking import IGNORE_INDEX
from ragloop.core.errors import DataError, UsageError


@dataclass
class Seq2SeqExample:
    """One encoder-decoder training example: encoder ids and target ids (every target id is in the loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_trainable(self) -> int:
        return len(self.labels)


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` (plain or peft-wrapped) is an encoder-decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def seq2seq_examples(row: SFTRow, policy: Any, *, max_length: int | None = None) -> list[Seq2SeqExample]:
    """The examples of one row (one per trainable assistant turn); DataError when a side is too long."""
    msgs = [{"role": m.role, "content": m.content} for m in row.messages]
    out = []
    for i, m in enumerate(row.messages):
        if m.role != "assistant" or not m.trainable or not m.content.strip():
            continue
        if i == 0:
            raise DataError("a conversation starts with an assistant turn; it needs a prompt before it")
        context: Any = "".join(x["content"] for x in msgs[:i]) if row.template == "raw" else msgs[:i]
        try:
            enc = policy.encode(context)
        except UsageError as e:  # an empty context
            raise DataError(f"assistant turn {i} has no usable context: {e.message}") from None
        target = [*policy.tokenize(m.content), int(policy.eos_id)]
        if max_length is not None and max(len(enc), len(target)) > max_length:
            raise DataError(f"row is {max(len(enc), len(target))} tokens, longer than max_length={max_length}")
        out.append(Seq2SeqExample(enc, target))
    if not out:
        raise DataError("row has no trainable tokens after tokenisation")
    return out


def tokenize_seq2seq_rows(rows: Sequence[SFTRow], policy: Any, *, max_length: int) -> tuple[list[Seq2SeqExample], DropReport]:
    """All rows' examples; rows too long or with nothing to learn are dropped and counted (as ``tokenize_rows``)."""
    report = DropReport()
    out: list[Seq2SeqExample] = []
    for row in rows:
        report.read += 1
        try:
            out.extend(seq2seq_examples(row, policy, max_length=max_length))
            report.kept += 1
        except DataError as e:
            report.drop("too_long" if "longer than max_length" in str(e) else "unmaskable")
    return out, report


def pad_seq2seq_batch(examples: Sequence[Seq2SeqExample], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``/``attention_mask`` (B, S) for the encoder and ``labels`` (B, T), -100 on padding."""
    import torch

    S = max(len(e.input_ids) for e in examples)
    T = max(len(e.labels) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)  # (B, S)
    attn = torch.zeros((B, S), dtype=torch.long)  # (B, S)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attn[b, : len(e.input_ids)] = 1
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def seq2seq_nll_sum(model: Any, batch: dict[str, Any], *, bf16: bool = False) -> tuple[Any, int]:
    """Summed target-token NLL of a ``pad_seq2seq_batch`` batch, and the number of target tokens."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]  # (B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    logits = logits.float()  # (B, T, V): position t predicts labels[:, t]
    n = int((labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, n
