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
    load_reward_model,
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


def test_train_frozen_save_load_rerank(tmp_path):
    res = train_reward_model(RewardConfig(out_dir=str(tmp_path / "rm"), freeze_backbone=True, epochs=30,
                                          batch_size=8, max_length=64, lr=5e-2), _pairs(16), test_pairs=_pairs(8))
    assert res.test_accuracy_before == 0.5 and res.test_accuracy >= 0.75 and res.test_auc >= 0.75
    rm = load_reward_model(res.model_dir)
    assert rm.score("Human: hi\n\nAssistant:", GOOD[0]) == pytest.approx(
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
