"""SFT of an encoder-decoder policy (tiny random T5 over the real tokenizer): examples put the context on the
encoder and only the assistant turn in the loss; full and LoRA train, export and load back; span-corruption
pairs train as raw rows."""

from __future__ import annotations

import math

import pytest
import torch

from ragloop.alignment.data import SFTRow
from ragloop.alignment.seq2seq_data import (
    pad_seq2seq_batch,
    seq2seq_examples,
    seq2seq_nll_sum,
    tokenize_seq2seq_rows,
)
from ragloop.alignment.sft import SFTConfig, mean_nll, run_sft
from ragloop.core.errors import ConfigError
from ragloop.models.seq2seq import Seq2SeqPolicy, span_corrupt
from ragloop.models.types import GenerationConfig

ROWS = [SFTRow(messages=[{"role": "user", "content": f"What is {a}+{b}?"},
                         {"role": "assistant", "content": f"It is {a + b}."}]) for a, b in [(1, 2), (3, 4), (5, 6)]]


@pytest.fixture
def t5(smol_tokenizer):
    from ragloop.models.tiny import build_tiny_t5

    def make(seed: int = 0) -> Seq2SeqPolicy:
        return Seq2SeqPolicy.from_model(build_tiny_t5(smol_tokenizer, d_model=32, seed=seed), smol_tokenizer,
                                        name="tiny-t5")

    return make


def test_examples_put_only_the_target_in_the_loss(t5):
    p = t5()
    row = SFTRow(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Bye!", "trainable": False},
                           {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hey."}])
    ex = seq2seq_examples(row, p)
    assert len(ex) == 2  # one example per trainable assistant turn
    msgs = [{"role": m.role, "content": m.content} for m in row.messages]
    assert ex[0].input_ids == p.encode(msgs[:2]) and ex[0].labels == [*p.tokenize("Hello!"), p.eos_id]
    assert ex[1].input_ids == p.encode(msgs[:6]) and ex[1].labels == [*p.tokenize("Hey."), p.eos_id]
    raw = SFTRow(messages=[{"role": "user", "content": "in <extra_id_0> text"},
                           {"role": "assistant", "content": "<extra_id_0> put <extra_id_1>"}], template="raw")
    (r,) = seq2seq_examples(raw, p)
    assert r.input_ids == p.encode("in <extra_id_0> text")  # no chat template on a raw row


def test_loss_is_the_targets_nll_whatever_the_padding(t5):
    p = t5()
    exs, report = tokenize_seq2seq_rows(ROWS, p, max_length=64)
    assert report.kept == 3 and len(exs) == 3
    batch = pad_seq2seq_batch(exs, p.pad_id)
    with torch.no_grad():
        total, n = seq2seq_nll_sum(p.model, batch)
        singles = sum(float(seq2seq_nll_sum(p.model, pad_seq2seq_batch([e], p.pad_id))[0]) for e in exs)
        single0 = float(seq2seq_nll_sum(p.model, pad_seq2seq_batch([exs[0]], p.pad_id))[0])
    assert n == sum(len(e.labels) for e in exs)
    assert float(total) == pytest.approx(singles, rel=1e-4)
    # the same figure from the policy's teacher-forced score (which leaves out the EOS token)
    first = ROWS[0].messages
    lp = p.score([{"role": "user", "content": first[0].content}], first[1].content)
    assert -sum(lp) == pytest.approx(single0 - (-_eos_logprob(p, exs[0])), rel=1e-4)


def _eos_logprob(p, ex):
    ids = torch.tensor([ex.input_ids])
    dec = torch.tensor([[p.start_id, *ex.labels[:-1]]])
    with torch.no_grad():
        logits = p.model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
    return float(torch.log_softmax(logits[0, -1], -1)[p.eos_id])


def test_too_long_rows_are_dropped_and_counted(t5):
    _, report = tokenize_seq2seq_rows(ROWS, t5(), max_length=4)
    assert report.kept == 0 and report.dropped["too_long"] == 3


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_trains_exports_and_loads(t5, tmp_path, method):
    from ragloop.models.loading import load_policy

    p = t5()
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    exs, _ = tokenize_seq2seq_rows(ROWS, p, max_length=64)
    nll0 = mean_nll(p.model, exs, p.pad_id)
    cfg = SFTConfig(out_dir=str(tmp_path / method), method=method, lr=3e-3 if method == "full" else 3e-2,
                    batch_size=3, max_steps=6, max_length=64, lora_r=4, lora_alpha=8, seed=0, name=f"t5-{method}",
                    schedule="constant")
    res = run_sft(cfg, p, ROWS, general_rows=ROWS[:1])
    assert res.steps == 6 and math.isfinite(res.final_loss) and res.skipped_steps == 0
    after = p.model.state_dict()
    assert set(after) == set(before)  # LoRA merged: a plain T5 again
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert mean_nll(p.model, exs, p.pad_id) < nll0  # it learned the targets
    assert res.forgetting is not None
    loaded = load_policy(res.policy_dir)
    assert isinstance(loaded, Seq2SeqPolicy) and loaded.name == f"t5-{method}"
    cfg_g = GenerationConfig(greedy=True, max_new_tokens=6)
    assert loaded.generate("What is 1+2?", cfg_g)[0].token_ids == p.generate("What is 1+2?", cfg_g)[0].token_ids


def test_span_corruption_pairs_train_as_raw_rows(t5, tmp_path):
    p = t5()
    texts = ["the quick brown fox jumps over the lazy dog near the river bank today",
             "a small model learns to fill in the missing words of a sentence"]
    rows = []
    for i, t in enumerate(texts):
        inp, tgt = span_corrupt(t, seed=i)
        rows.append(SFTRow(messages=[{"role": "user", "content": inp}, {"role": "assistant", "content": tgt}],
                           template="raw", source="span-corruption"))
    res = run_sft(SFTConfig(out_dir=str(tmp_path / "sc"), method="full", lr=1e-3, batch_size=2, max_steps=2,
                            max_length=64, export=False), p, rows)
    assert res.steps == 2 and math.isfinite(res.final_loss)


def test_prompt_tuning_is_refused_for_encoder_decoders(t5, tmp_path):
    with pytest.raises(ConfigError, match="prompt tuning"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "pt"), method="prompt", max_steps=1), t5(), ROWS)


def test_grad_norm_penalty_works_on_a_seq2seq_policy(t5, tmp_path):
    res = run_sft(SFTConfig(out_dir=str(tmp_path / "gp"), method="full", lr=1e-3, batch_size=3, max_steps=1,
                            max_length=64, export=False, grad_norm_penalty=0.1), t5(), ROWS)
    assert res.history[0]["grad_penalty"] > 0 and math.isfinite(res.final_loss)
