"""SFT on the tiny random Llama (real tokenizer and chat template): parameters change, finite loss, same seed →
same loss, exact resume after a kill, NaN skipped and counted, repeated NaNs abort with a good checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from ragloop.alignment.checkpoint import load_checkpoint
from ragloop.alignment.data import SFTRow
from ragloop.alignment.sft import SFTConfig, epoch_batches, lr_at, mix_rows, run_sft
from ragloop.core.errors import ConfigError, DataError, TrainingError
from ragloop.models.local import LocalPolicy

ROWS = [
    SFTRow(messages=[{"role": "user", "content": f"What is {a}+{b}?"},
                     {"role": "assistant", "content": f"def solution():\n    return {a} + {b}"}], source="math")
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]
]
GENERAL = [SFTRow(messages=[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}])]


@pytest.fixture
def policy(smol_tokenizer, tiny_model_factory):
    return LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny", backend="hf")


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), method="lora", lr=5e-3, batch_size=2, max_steps=4, max_length=128,
                lora_r=4, lora_alpha=8, save_every=2, seed=1, export=False)
    base.update(kw)
    return SFTConfig(**base)


def test_pure_helpers():
    assert lr_at(0, base=1.0, warmup=2, horizon=10, schedule="cosine") == 0.5
    assert lr_at(2, base=1.0, warmup=2, horizon=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_at(10, base=1.0, warmup=2, horizon=10, schedule="cosine") == pytest.approx(0.1)
    b = epoch_batches([5, 1, 3, 2, 4], 2, epoch=0, seed=0)
    assert sorted(i for x in b for i in x) == [0, 1, 2, 3, 4] and b == epoch_batches([5, 1, 3, 2, 4], 2, 0, 0)
    mixed = mix_rows({"a": [1, 2], "b": [10]}, {"a": 1.0, "b": 0.0}, total=4, seed=0)
    assert sorted(mixed) == [1, 1, 2, 2]
    with pytest.raises(DataError):
        mix_rows({"a": []}, {"a": 1.0}, total=1, seed=0)
    with pytest.raises(ConfigError, match="lr"):
        SFTConfig(out_dir="x", lr=-1.0)
    with pytest.raises(ConfigError, match="method"):
        SFTConfig(out_dir="x", method="qlora")


def test_lora_trains_exports_and_loads(policy, tmp_path):
    from ragloop.models.loading import load_policy

    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    res = run_sft(_cfg(tmp_path, export=True, name="tiny-sft"), policy, ROWS, general_rows=GENERAL)
    assert res.steps == 4 and math.isfinite(res.final_loss) and res.skipped_steps == 0
    after = policy.model.state_dict()
    assert set(after) == set(before)  # LoRA merged back: a plain model again
    assert any(not torch.equal(before[k], after[k]) for k in before), "merged weights did not change"
    assert res.general_nll_before is not None and res.forgetting is not None
    loaded = load_policy(res.policy_dir)
    assert loaded.name == "tiny-sft"
    ids = torch.tensor([policy.tokenize("def solution():")])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, policy.model(ids).logits, atol=1e-4)
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "curves.png").is_file()


def test_full_and_prompt_tuning_change_parameters(smol_tokenizer, tiny_model_factory, tmp_path):
    p = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny", backend="hf")
    w0 = p.model.model.layers[0].mlp.up_proj.weight.clone()
    res = run_sft(_cfg(tmp_path / "full", method="full", lr=1e-2, max_steps=2), p, ROWS)
    assert math.isfinite(res.final_loss)
    assert not torch.equal(w0, p.model.model.layers[0].mlp.up_proj.weight)
    p2 = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny", backend="hf")
    res = run_sft(_cfg(tmp_path / "pt", method="prompt", num_virtual_tokens=4, max_steps=2, export=True), p2, ROWS)
    ck = load_checkpoint(tmp_path / "pt" / "run")
    (name, soft), = ck.tensors["trainable"].items()
    assert "prompt_encoder" in name and soft.shape[0] == 4
    assert (tmp_path / "pt" / "run" / "prompt_adapter").is_dir()


def test_same_seed_same_loss_and_exact_resume(smol_tokenizer, tiny_model_factory, tmp_path):
    def fresh():
        return LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny", backend="hf")

    full = run_sft(_cfg(tmp_path / "a"), fresh(), ROWS)
    again = run_sft(_cfg(tmp_path / "b"), fresh(), ROWS)
    losses = [r["loss"] for r in full.history]
    assert losses == [r["loss"] for r in again.history]

    class Killed(Exception):
        pass

    def kill_at_3(step, loss):
        if step == 3:  # after the checkpoint at step 2, mid-way through step 3
            raise Killed
        return loss

    with pytest.raises(Killed):
        run_sft(_cfg(tmp_path / "c"), fresh(), ROWS, loss_hook=kill_at_3)
    p = fresh()
    resumed = run_sft(_cfg(tmp_path / "c"), p, ROWS, resume=True)
    assert resumed.steps == 4
    assert [r["loss"] for r in resumed.history] == losses  # the curve continues exactly
    ref = fresh()
    run_sft(_cfg(tmp_path / "d"), ref, ROWS)
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), p.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="lr"):
        run_sft(_cfg(tmp_path / "c", lr=1e-3), fresh(), ROWS, resume=True)
    with pytest.raises(DataError, match="data differ"):
        run_sft(_cfg(tmp_path / "c"), fresh(), ROWS[:3], resume=True)
    with pytest.raises(TrainingError, match="no checkpoint"):
        run_sft(_cfg(tmp_path / "none"), fresh(), ROWS, resume=True)


def test_nan_skipped_then_abort_keeps_good_checkpoint(policy, tmp_path):
    def one_nan(step, loss):
        return loss * float("nan") if step == 1 else loss

    res = run_sft(_cfg(tmp_path / "a"), policy, ROWS, loss_hook=one_nan)
    assert res.skipped_steps == 1 and res.steps == 4 and math.isfinite(res.final_loss)

    def nan_from_2(step, loss):
        return loss * float("nan") if step >= 2 else loss

    with pytest.raises(TrainingError, match="non-finite"):
        run_sft(_cfg(tmp_path / "b", max_steps=8, max_nonfinite=3), policy, ROWS, loss_hook=nan_from_2)
    ck = load_checkpoint(tmp_path / "b" / "run")
    # steps 0-1 trained, 2-3 skipped (weights unchanged, checkpoint at 4 still good), 4 is the third NaN
    assert ck.step == 4 and ck.state["guard"] == {"skipped": 2, "consecutive": 2}
    assert all(torch.isfinite(t).all() for t in ck.tensors["trainable"].values())


def test_bad_data_is_a_clear_error(policy, tmp_path):
    with pytest.raises(DataError, match="no SFT rows"):
        run_sft(_cfg(tmp_path), policy, [])
    long = [SFTRow(messages=[{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}])]
    with pytest.raises(DataError, match="max_length"):
        run_sft(_cfg(tmp_path), policy, long)
