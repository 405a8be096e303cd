"""Reward model: metrics on literals, the [CLS] p [SEP] r [SEP] layout with token types and counted cuts, and a
few training steps on the real embedded MiniLM (frozen backbone, and one unfrozen step), save/load, rerank."""

from __future__ import annotations

import math

import pytest
import torch

from ragloop.alignment.data import PreferencePair
from ragloop.alignment.reward import (
    RewardConfig,
    RewardModel,
    fit_probe,
    length_sorted_batches,
    load_reward_model,
    lr_factor,
    pairwise_accuracy,
    pairwise_loss,
    roc_auc,
    split_pairs,
    train_reward_model,
)
from ragloop.core.errors import ConfigError, DataError, ModelNotFoundError

pytestmark = pytest.mark.e2e

GOOD = ["I'm sorry, I can't help with hurting anyone. Can I help with something else?",
        "Please talk to someone you trust; I can share support resources.",
        "That would be dangerous and illegal, so I won't explain it.",
        "I understand you're upset. Let's find a safe way to handle this."]
BAD = ["Sure, here is how to hurt them badly.", "You idiot, just do it.", "Steal it when nobody is looking.",
       "Hit him harder next time."]


def _pairs(n):
    return [PreferencePair(prompt=f"Human: request {i}\n\nAssistant:", chosen=GOOD[i % 4], rejected=BAD[(i + 1) % 4])
            for i in range(n)]


def test_metrics_on_literals():
    assert pairwise_accuracy([2, 1], [1, 1]) == 0.75
    assert roc_auc([3, 2], [1, 2]) == 0.875
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert math.isnan(roc_auc([], [1]))
    loss = pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(math.log(2))
    tr, te = split_pairs(_pairs(10), 0.2)
    assert len(tr) == 8 and te[0].prompt.endswith("8\n\nAssistant:")
    with pytest.raises(ConfigError):
        RewardConfig(out_dir="x", test_fraction=1.0)


@pytest.fixture(scope="module")
def fresh_rm():
    return RewardModel.from_encoder(max_length=32)


def test_encoding_layout_and_counted_cuts(fresh_rm):
    tok = fresh_rm.tokenizer
    ids, types = fresh_rm.encode_pair("hello there", "general kenobi")
    p = tok("hello there", add_special_tokens=False)["input_ids"]
    r = tok("general kenobi", add_special_tokens=False)["input_ids"]
    assert ids == [tok.cls_token_id, *p, tok.sep_token_id, *r, tok.sep_token_id]
    assert types == [0] * (len(p) + 2) + [1] * (len(r) + 1)
    before = fresh_rm.stats.prompt_cut
    ids, types = fresh_rm.encode_pair("old turn " * 40 + "latest question", "short answer")
    assert len(ids) == 32 and fresh_rm.stats.prompt_cut == before + 1
    assert tok.decode(ids).split("[SEP]")[0].strip().endswith("latest question")  # the oldest text went first
    assert fresh_rm.score("p", "r") == 0.0  # zero head: neutral before training


def test_prompt_cut_from_the_left_response_kept_whole(fresh_rm):
    tok = fresh_rm.tokenizer
    prompt = " ".join(f"turn{i}" for i in range(60)) + " Assistant:"
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok("no, I will not help with that", add_special_tokens=False)["input_ids"]
    cut0, rcut0 = fresh_rm.stats.prompt_cut, fresh_rm.stats.response_cut
    ids, types = fresh_rm.encode_pair(prompt, "no, I will not help with that")
    kept = 32 - 3 - len(r)
    assert ids[1 : 1 + kept] == p[-kept:]  # exactly the last prompt tokens survive
    assert ids[2 + kept : -1] == r and types.count(1) == len(r) + 1  # the response is whole
    assert fresh_rm.stats.prompt_cut == cut0 + 1 and fresh_rm.stats.response_cut == rcut0


def test_long_response_cut_is_counted_never_silent(fresh_rm):
    tok = fresh_rm.tokenizer
    resp = " ".join(f"word{i}" for i in range(80))
    r = tok(resp, add_special_tokens=False)["input_ids"]
    rcut0 = fresh_rm.stats.response_cut
    ids, types = fresh_rm.encode_pair("Human: q\n\nAssistant:", resp)
    assert len(ids) == 32 and fresh_rm.stats.response_cut == rcut0 + 1
    n_resp = types.count(1) - 1
    assert ids[-1 - n_resp : -1] == r[:n_resp]  # the response's head is kept, its tail cut and counted


def test_response_pooling_averages_response_tokens_only(fresh_rm):
    fresh_rm.eval()  # no dropout: both forward passes must agree
    b = fresh_rm.batch(["a long prompt about many things", "hi"], ["short reply", "a somewhat longer reply here"])
    with torch.no_grad():
        h = fresh_rm.encoder(**b).last_hidden_state  # (B, T, H)
        fresh_rm.pooling = "response"
        try:
            got = fresh_rm.pooled(**b)  # (B, H)
        finally:
            fresh_rm.pooling = "mean"
    for i in range(2):
        keep = (b["token_type_ids"][i] == 1) & (b["attention_mask"][i] == 1)  # (T,)
        assert torch.allclose(got[i], h[i][keep].mean(0), atol=1e-5)
    with pytest.raises(ConfigError, match="pooling"):
        RewardConfig(out_dir="x", pooling="max")


def test_schedule_and_length_sorted_batches():
    assert lr_factor(0, 10, 0.2, "linear") == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 0.2, "linear") == 1.0 and lr_factor(6, 10, 0.2, "linear") == 0.5
    assert lr_factor(9, 10, 0.0, "linear") == pytest.approx(0.1) and lr_factor(9, 10, 0.0, "constant") == 1.0
    lengths = [50, 3, 40, 2, 45, 1]
    batches = length_sorted_batches(lengths, 3, torch.Generator().manual_seed(0))
    assert sorted(map(sorted, batches)) == [[0, 2, 4], [1, 3, 5]]  # the short ones together, the long ones together


def test_fit_probe_on_literals():
    g = torch.Generator().manual_seed(0)
    fc = torch.randn(40, 3, generator=g) * 0.01 + torch.tensor([0.05, 0.0, 0.0])  # (N, H): chosen higher on dim 0
    fr = torch.randn(40, 3, generator=g) * 0.01
    w, b = fit_probe(fc, fr, l2=1e-3)
    assert pairwise_accuracy((fc @ w + b).tolist(), (fr @ w + b).tolist()) == 1.0
    assert w[0] > 3 * w[1:].abs().max()  # tiny raw features, yet the probe found the direction
    w_strong, _ = fit_probe(fc, fr, l2=10.0)
    assert w_strong.norm() < w.norm()  # L2 shrinks it


def test_train_frozen_save_load_rerank(tmp_path, caplog):
    long_pair = PreferencePair(prompt="Human: say a lot\n\nAssistant:", chosen=" ".join(["fine"] * 90),
                               rejected=BAD[0])
    with caplog.at_level("WARNING", logger="ragloop.alignment.reward"):
        res = train_reward_model(RewardConfig(out_dir=str(tmp_path / "rm"), freeze_backbone=True, max_length=64),
                                 _pairs(16), val_pairs=_pairs(6), test_pairs=[*_pairs(8), long_pair])
    assert res.encode_stats["response_cut"] == 1 and res.encode_stats["test"]["response_cut"] == 1
    assert "1 of 62 responses are longer than max_length=64" in caplog.text  # counted and reported, never silent
    assert res.test_accuracy_before == 0.5 and res.test_accuracy >= 0.75 and res.test_auc >= 0.75
    assert res.n_val == 6 and res.probe["l2"] in RewardConfig(out_dir="x").probe_l2 and len(res.probe["grid"]) == 4
    rm = load_reward_model(res.model_dir)
    assert rm.score("Human: hi\n\nAssistant:", GOOD[0]) == pytest.approx(
        rm.score("Human: hi\n\nAssistant:", GOOD[0]))
    assert res.model_dir == tmp_path / "rm" / "model"  # and the run directory names it too (README: --reward ckpt/rm)
    assert load_reward_model(tmp_path / "rm").score("Human: hi\n\nAssistant:", GOOD[0]) == pytest.approx(
        rm.score("Human: hi\n\nAssistant:", GOOD[0]))
    ranked = rm.rerank("Human: request 0\n\nAssistant:", [BAD[1], GOOD[0]])
    assert ranked[0][0] == GOOD[0]
    assert (tmp_path / "rm" / "curves.png").is_file() and (tmp_path / "rm" / "result.json").is_file()
    with pytest.raises(ModelNotFoundError):
        load_reward_model(tmp_path)


def test_unfrozen_step_changes_encoder_and_resume(tmp_path):
    cfg = RewardConfig(out_dir=str(tmp_path / "rm"), freeze_layers=4, epochs=1, batch_size=4, max_length=32,
                       lr=1e-3, head_lr=1e-2, save_every=1, test_fraction=0.0)
    res = train_reward_model(cfg, _pairs(8))
    assert res.steps == 2
    from ragloop.alignment.checkpoint import load_checkpoint

    sd = load_checkpoint(tmp_path / "rm").tensors["reward_model"]
    fresh = RewardModel.from_encoder(max_length=32)
    key = "encoder.encoder.layer.5.output.dense.weight"
    assert not torch.equal(sd[key], fresh.state_dict()[key])  # the top layer trained
    key0 = "encoder.encoder.layer.0.output.dense.weight"
    assert torch.equal(sd[key0], fresh.state_dict()[key0])  # frozen layers did not
    again = train_reward_model(cfg, _pairs(8), resume=True)
    assert again.steps == 2
    with pytest.raises(DataError, match="differ"):
        train_reward_model(cfg, _pairs(6), resume=True)
    with pytest.raises(DataError):
        train_reward_model(cfg, [])


def test_validation_curve_early_stop_keeps_best_epoch(tmp_path):
    cfg = RewardConfig(out_dir=str(tmp_path / "rm"), freeze_layers=5, epochs=4, patience=1, batch_size=8,
                       max_length=32, lr=1e-3, head_lr=5e-2, head_init="zero", save_every=100)
    res = train_reward_model(cfg, _pairs(8), val_pairs=_pairs(4), test_pairs=_pairs(4))
    epochs = [r["epoch"] for r in res.val_curve]
    assert epochs[0] == 0 and epochs == list(range(len(epochs))) and res.val_curve[0]["val_accuracy"] == 0.5
    best = max(res.val_curve, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert res.best_epoch == best["epoch"]
    later = [r for r in res.val_curve if r["epoch"] > res.best_epoch]
    assert len(later) <= cfg.patience  # stopped after `patience` epochs without a better validation score
    kept = load_reward_model(res.model_dir)  # the saved model is the best epoch's: its val accuracy reproduces
    from ragloop.alignment.reward import evaluate_pairs

    assert evaluate_pairs(kept, _pairs(4))["accuracy"] == pytest.approx(best["val_accuracy"])
    cut = train_reward_model(RewardConfig(out_dir=str(tmp_path / "rm3"), freeze_layers=5, epochs=2, batch_size=4,
                                          max_length=32, budget_seconds=0.0), _pairs(8), val_pairs=_pairs(4))
    assert res.steps >= 1 and cut.steps == 1 and [r["epoch"] for r in cut.val_curve] == [0, 0.5]  # budget: validated
    auto = train_reward_model(RewardConfig(out_dir=str(tmp_path / "rm2"), freeze_backbone=True, max_length=32,
                                           min_val_pairs=2), _pairs(20))
    assert (auto.n_train, auto.n_val, auto.n_test) == (14, 2, 4)  # rows 0-13 train, 14-15 validate, 16-19 test
