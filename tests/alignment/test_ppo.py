"""PPO on the tiny random Llama with the real rollout path: ratio == 1 on the first minibatch, rollout and
training log-probs agree, parameters change, exact resume, NaN rewards skipped/aborted, rollback on KL."""

from __future__ import annotations

import math

import pytest
import torch

from ragloop.alignment.checkpoint import load_checkpoint
from ragloop.alignment.ppo import (
    PPOConfig,
    PPOItem,
    build_episode_batch,
    forward_episodes,
    make_reward_fn,
    run_ppo,
)
from ragloop.core.errors import ConfigError, TrainingError
from ragloop.models.local import LocalPolicy

ITEMS = [PPOItem(prompt=f"Q: {a} plus {a}?\nA:", meta={"gold": str(2 * a)}) for a in range(1, 7)]


def digit_reward(item, completion):
    """A programmatic check: +1 per digit in the completion (capped), −0.1 otherwise."""
    return min(1.0, sum(ch.isdigit() for ch in completion) / 3) - 0.1


def _policy(smol_tokenizer, tiny_model_factory):
    return LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "ppo"), iterations=2, batch_prompts=3, samples_per_prompt=2, max_new_tokens=6,
                minibatch_size=3, ppo_epochs=2, lr=1e-2, seed=3, save_every=1, export=False)
    base.update(kw)
    return PPOConfig(**base)


def test_episode_batch_layout():
    b = build_episode_batch([[1, 2], [3]], [[7], [8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 7, 0], [0, 3, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert b.resp_mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert b.prompt_width == 2


def test_forward_matches_decode_logprobs(smol_tokenizer, tiny_model_factory):
    from ragloop.models.types import GenerationConfig

    pol = _policy(smol_tokenizer, tiny_model_factory)
    gens = pol.generate_batch(["Q: 1?\nA:", "Q: a much longer question?\nA:"],
                              GenerationConfig(max_new_tokens=5, temperature=1.0, seed=0, logprobs=True))
    p_ids = [pol.encode("Q: 1?\nA:"), pol.encode("Q: a much longer question?\nA:")]
    r_ids = [gens[0][0].token_ids, gens[1][0].token_ids]
    b = build_episode_batch(p_ids, r_ids, pol.pad_id)
    with torch.no_grad():
        lp, _, _ = forward_episodes(pol.model, None, b)
    for n in range(2):
        got = lp[n, : len(r_ids[n])].tolist()
        assert got == pytest.approx(gens[n][0].logprobs, abs=1e-3)


def test_ppo_runs_ratio_one_params_change_and_exports(smol_tokenizer, tiny_model_factory, tmp_path):
    from ragloop.models.loading import load_policy

    pol = _policy(smol_tokenizer, tiny_model_factory)
    w0 = {k: v.clone() for k, v in pol.model.state_dict().items()}
    res = run_ppo(_cfg(tmp_path, export=True, name="tiny-ppo"), pol, ITEMS, make_reward_fn(check=digit_reward))
    assert res.iterations == 2 and res.rollbacks == 0
    for row in res.history:
        assert row["ppo/ratio_first_dev"] <= 1e-3  # π/π_old == 1 on the first minibatch after each rollout
        assert row["rollout/logprob_dev"] < 1e-2  # the decode path and the training forward agree
        for k in ("ppo/approx_kl", "ppo/clipfrac", "ppo/explained_var", "objective/kl", "env/reward_mean"):
            assert k in row
        assert math.isfinite(row["ppo/policy_loss"])
    after = pol.model.state_dict()
    assert set(after) == set(w0) and any(not torch.equal(w0[k], after[k]) for k in w0)
    loaded = load_policy(res.policy_dir)
    assert loaded.name == "tiny-ppo"
    assert (tmp_path / "ppo" / "curves.png").is_file()


def test_ppo_full_finetune_and_kl_to_reference(smol_tokenizer, tiny_model_factory, tmp_path):
    pol = _policy(smol_tokenizer, tiny_model_factory)
    res = run_ppo(_cfg(tmp_path, lora=False, lr=1e-3, iterations=2), pol, ITEMS, make_reward_fn(check=digit_reward))
    assert res.history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # starts at the reference
    assert res.history[-1]["objective/kl"] != 0.0


def test_ppo_exact_resume(smol_tokenizer, tiny_model_factory, tmp_path):
    full = run_ppo(_cfg(tmp_path / "a", iterations=3), _policy(smol_tokenizer, tiny_model_factory), ITEMS,
                   make_reward_fn(check=digit_reward))

    class Killed(Exception):
        pass

    def kill(it, scores):
        if it == 2:
            raise Killed
        return scores

    with pytest.raises(Killed):
        run_ppo(_cfg(tmp_path / "b", iterations=3), _policy(smol_tokenizer, tiny_model_factory), ITEMS,
                make_reward_fn(check=digit_reward), hooks={"scores": kill})
    pol = _policy(smol_tokenizer, tiny_model_factory)
    resumed = run_ppo(_cfg(tmp_path / "b", iterations=3), pol, ITEMS, make_reward_fn(check=digit_reward), resume=True)
    keys = ("env/reward_mean", "ppo/policy_loss", "objective/kl")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]


def test_ppo_nan_rewards_skipped_then_abort(smol_tokenizer, tiny_model_factory, tmp_path):
    def one_nan(it, s):
        return s * float("nan") if it == 0 else s

    res = run_ppo(_cfg(tmp_path / "a"), _policy(smol_tokenizer, tiny_model_factory), ITEMS,
                  make_reward_fn(check=digit_reward), hooks={"scores": one_nan})
    assert res.skipped == 1

    def always_nan(it, s):
        return s * float("nan") if it >= 1 else s

    with pytest.raises(TrainingError, match="non-finite"):
        run_ppo(_cfg(tmp_path / "b", iterations=6, max_nonfinite=2), _policy(smol_tokenizer, tiny_model_factory),
                ITEMS, make_reward_fn(check=digit_reward), hooks={"scores": always_nan})
    ck = load_checkpoint(tmp_path / "b" / "ppo")
    assert ck.step == 1 and all(torch.isfinite(t).all() for t in ck.tensors["policy"].values())


def test_ppo_rolls_back_then_stops_on_kl(smol_tokenizer, tiny_model_factory, tmp_path):
    with pytest.raises(TrainingError, match="rollbacks"):
        run_ppo(_cfg(tmp_path, iterations=6, lr=0.5, max_kl=1e-9, max_rollbacks=1),
                _policy(smol_tokenizer, tiny_model_factory), ITEMS, make_reward_fn(check=digit_reward))


def test_ppo_config_errors():
    with pytest.raises(ConfigError, match="clip_coef"):
        PPOConfig(out_dir="x", clip_coef=1.5)
    with pytest.raises(ConfigError, match="reward"):
        make_reward_fn()
