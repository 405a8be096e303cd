"""GRPO/RLOO: group advantages against hand-computed values, truncated importance weights on literal tensors,
the observation-token mask of a multi-step episode, the health alarms on synthetic inputs, and runs on the tiny
random Llama over real agent episodes (PAL in the real sandbox, ReAct with the calculator): finite loss,
changed parameters, keep-best selection, the flat-reward alarm."""

from __future__ import annotations

import math

import pytest
import torch

from ragloop.alignment.grpo import (
    CallRow,
    GRPOConfig,
    GRPOHealth,
    GRPOItem,
    call_rows,
    make_episode_reward,
    row_loss_mask,
    run_grpo,
)
from ragloop.alignment.ppo import build_episode_batch
from ragloop.alignment.rl import group_advantages, policy_loss, truncated_is_weights, zero_std_fraction
from ragloop.core.errors import ConfigError
from ragloop.core.trace import ModelCallRecord, Step, Trace
from ragloop.models.local import LocalPolicy

# --------------------------------------------------------------------------------------------- pure math


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    g = group_advantages(r, "grpo", eps=0.0 + 1e-12)
    # group 0: mean 0.25, sample std sqrt(0.25) = 0.5 → (1 − .25)/.5 = 1.5, (0 − .25)/.5 = −0.5
    assert g[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-6)
    assert g[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a flat group teaches nothing
    s = math.sqrt(5 / 3)  # std of 0, 1, 2, 3 with 1/(K−1)
    assert g[2].tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], abs=1e-6)
    loo = group_advantages(r, "rloo")
    # RLOO: r_k − mean of the other three: 1 − 0 = 1; 0 − 1/3
    assert loo[0].tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3], abs=1e-6)
    assert loo[2].tolist() == pytest.approx([0 - 2, 1 - 5 / 3, 2 - 4 / 3, 3 - 1], abs=1e-6)
    assert zero_std_fraction(r) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="grpo' or 'rloo"):
        group_advantages(r, "ppo")


def test_truncated_importance_weights_literal():
    train = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.1, 0.1]]))
    rollout = torch.log(torch.tensor([[0.25, 0.4, 0.1], [0.3, 0.1, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = truncated_is_weights(train, rollout, mask, cap=2.0)
    # 0.5/0.25 = 2, 0.2/0.4 = 0.5, 0.9/0.1 = 9 → truncated to 2; equal probs → 1; padding → 0
    assert w.view(-1).tolist() == pytest.approx([2.0, 0.5, 2.0, 1.0, 1.0, 0.0], abs=1e-6)
    # the weight scales each token's surrogate term: with ratio 1 and A = 1 the loss is −mean(w)
    adv = torch.ones(2, 3)
    plain = policy_loss(train, train, adv, mask, 0.2)
    weighted = policy_loss(train, train, adv, mask, 0.2, token_weights=w)
    assert float(plain.loss) == pytest.approx(-1.0)
    assert float(weighted.loss) == pytest.approx(-(2 + 0.5 + 2 + 1 + 1) / 5)


def test_observation_tokens_get_no_loss():
    """A two-step ReAct episode: the second call's prompt holds the first generation and the observation."""
    sys_q = [1, 2, 3]
    gen1 = [10, 11, 12]  # "Thought … Action 1: Calculator[6*7]"
    obs = [50, 51, 52, 53]  # "Observation 1: 42" inserted by the agent
    gen2 = [13, 14]  # "Finish[42]"
    calls = [ModelCallRecord(step=1, prompt_ids=sys_q, completions=[
                 {"token_ids": gen1, "logprobs": [-0.1, -0.2, -0.3], "finish_reason": "stop"}]),
             ModelCallRecord(step=2, prompt_ids=sys_q + gen1 + obs, completions=[
                 {"token_ids": gen2, "logprobs": [-0.4, -0.5], "finish_reason": "stop"}])]
    t = Trace(question="What is 6*7?", agent="react", calls=calls)
    rows = call_rows(t, episode=7)
    assert [r.episode for r in rows] == [7, 7]
    masks = [row_loss_mask(r) for r in rows]
    seqs = [r.prompt_ids + r.token_ids for r in rows]
    assert masks[0] == [0, 0, 0, 1, 1, 1]
    assert masks[1] == [0] * 10 + [1, 1]
    trained = [tok for s, m in zip(seqs, masks, strict=True) for tok, on in zip(s, m, strict=True) if on]
    assert trained == gen1 + gen2  # every generated token once, no observation token, no prompt token
    assert not set(obs) & set(trained)
    # the batch the loss runs on has the same mask (responses only)
    b = build_episode_batch([r.prompt_ids for r in rows], [r.token_ids for r in rows], pad_id=0)
    assert b.resp_mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert rows[1].rollout_logprobs == [-0.4, -0.5]


def test_health_alarms_on_synthetic_inputs():
    def h():
        return GRPOHealth(patience=2, max_kl=1.0, min_len_ratio=0.2, max_new_tokens=64)

    ok = dict(zero_std_frac=0.5, reward_mean=0.3, truncated_frac=0.1, kl=0.01, mean_len=40.0)
    a = h()
    assert a.observe(**{**ok, "zero_std_frac": 1.0}) is None  # one flat iteration is allowed
    msg = a.observe(**{**ok, "zero_std_frac": 1.0})
    assert msg is not None and "same reward" in msg and "raise temperature or samples" in msg
    a = h()
    a.observe(**{**ok, "truncated_frac": 1.0})
    assert "token limit" in a.observe(**{**ok, "truncated_frac": 1.0})
    assert "KL blow-up" in h().observe(**{**ok, "kl": 3.0})
    assert "KL blow-up" in h().observe(**{**ok, "kl": float("nan")})
    a = h()
    assert a.observe(**ok) is None
    assert a.observe(**{**ok, "mean_len": 5.0}) is None
    assert "length collapse" in a.observe(**{**ok, "mean_len": 4.0})
    a = h()  # conditions must hold on consecutive iterations
    for z in (1.0, 0.5, 1.0, 0.5):
        assert a.observe(**{**ok, "zero_std_frac": z}) is None
    # reward hacking on the validation slice: score up, accuracy down, for `patience` validations
    recs = [{"iteration": 0, "score": 0.5, "accuracy": 0.4}, {"iteration": 5, "score": 0.7, "accuracy": 0.3}]
    assert h().observe_validation(recs) is None  # one validation is not yet a trend
    recs.append({"iteration": 10, "score": 0.8, "accuracy": 0.2})
    msg = h().observe_validation(recs)
    assert msg is not None and "reward rising while accuracy falls" in msg and "0.4 → 0.2" in msg
    recs[-1]["accuracy"] = 0.5  # accuracy recovered: no alarm
    assert h().observe_validation(recs) is None
    assert h().observe_validation([{**r, "accuracy": None} for r in recs]) is None  # no gold answers


def test_config_and_reward_errors():
    with pytest.raises(ConfigError, match="samples must be >= 2"):
        GRPOConfig(out_dir="x", samples=1)
    with pytest.raises(ConfigError, match="advantage"):
        GRPOConfig(out_dir="x", advantage="ppo")
    with pytest.raises(ConfigError, match="tis_cap"):
        GRPOConfig(out_dir="x", tis_cap=0.5)
    with pytest.raises(ConfigError, match="needs a reward"):
        make_episode_reward(w_correct=0.0, w_format=0.0)
    fn = make_episode_reward(task="gsm8k", w_correct=1.0, w_format=0.25)
    ts = [Trace(question="q", agent="pal", answer="42.0", steps=[Step(index=0, code="return 42")]),
          Trace(question="q", agent="pal", answer="41", steps=[Step(index=0, code="return 41")]),
          Trace(question="q", agent="pal", answer=None)]
    assert fn([GRPOItem("q", "42")] * 3, ts) == [1.25, 0.25, 0.0]


def test_call_rows_skip_empty_and_mismatched_logprobs():
    t = Trace(question="q", calls=[ModelCallRecord(prompt_ids=[1], completions=[
        {"token_ids": [], "logprobs": [], "finish_reason": "stop"},
        {"token_ids": [5, 6], "logprobs": [-1.0], "finish_reason": "length"}])])
    rows = call_rows(t, 0)
    assert rows == [CallRow(0, [1], [5, 6], None, "length")]


# ------------------------------------------------------------------------------------ tiny-model runs

QS = [f"Tom has {a} apples and buys {a + 1} more. How many apples?" for a in range(1, 5)]
VAL = ["What is 6 times 7?", "A box holds 12 eggs. How many eggs in 2 boxes?"]


def _pal(pol, sandbox):
    from ragloop.agents.pal import PALAgent, PALConfig

    return PALAgent(pol, PALConfig(shots=0, max_new_tokens=8), sandbox=sandbox)


def _length_reward(items, traces):
    """A scripted reward with spread: the number of characters the episode generated, scaled."""
    return [sum(len(s.raw_output or "") for s in t.steps) / 40 for t in traces]


def _cfg(tmp_path, **kw):
    # patience 10: the random tiny model nearly always runs to the token limit, which would raise that alarm
    base = dict(out_dir=str(tmp_path / "grpo"), iterations=1, batch_questions=2, samples=3, max_new_tokens=8,
                minibatch_rows=6, lr=1e-2, seed=1, export=False, eval_every=1, patience=10)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture
def sandbox():
    from ragloop.agents.sandbox import Sandbox

    return Sandbox()


def test_grpo_pal_one_iteration_finite_loss_params_change(smol_tokenizer, tiny_model_factory, tmp_path, sandbox):
    pol = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    before = {n: p.detach().clone() for n, p in pol.model.named_parameters()}
    items = [GRPOItem(q) for q in QS]
    res = run_grpo(_cfg(tmp_path, lora=False, advantage="rloo"), pol, items, _pal, _length_reward, sandbox=sandbox)
    row = res.history[-1]
    assert res.iterations == 1 and res.stopped_by == "done"
    assert math.isfinite(row["grpo/loss"]) and row["grpo/updated"] == 1.0
    for k in ("grpo/reward_mean", "grpo/zero_std_frac", "grpo/kl", "grpo/clipfrac", "grpo/approx_kl",
              "grpo/is_weight_mean"):
        assert k in row and math.isfinite(row[k]), k
    # fp32 rollouts: the decode engine's log-probs are the training forward's, so every weight is ~1
    assert row["grpo/is_weight_mean"] == pytest.approx(1.0, abs=1e-2)
    changed = sum(not torch.equal(before[n], p) for n, p in pol.model.named_parameters())
    assert changed > 0


def test_grpo_react_multi_step_lora(smol_tokenizer, tiny_model_factory, tmp_path):
    from ragloop.agents.react import ReActAgent, ReActConfig, react_tools_for

    def make_react(pol, sandbox):
        return ReActAgent(pol, tools=react_tools_for("calculator"),
                          config=ReActConfig(shots=0, max_steps=2, max_new_tokens=8, fallback="none"))

    pol = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    seen = {}

    def after(it, trainable):
        seen[it] = {n: p.detach().clone() for n, p in trainable.items()}

    res = run_grpo(_cfg(tmp_path, lora=True, lr=5e-2, minibatch_rows=4), pol, [GRPOItem(q) for q in QS[:2]],
                   make_react, _length_reward, hooks={"after_update": after})
    row = res.history[-1]
    assert row["tokens/rows"] >= 2 * 3  # at least one call per episode; multi-step episodes add rows
    assert math.isfinite(row["grpo/loss"])
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in seen[1].items())


def test_keep_best_picks_the_best_validation(smol_tokenizer, tiny_model_factory, tmp_path, sandbox):
    """Scripted validation scores 0.1 (start), 0.5, 0.9, 0.2: iteration 2 wins and is the final policy."""
    from ragloop.alignment.checkpoint import load_checkpoint

    val_scores = iter([0.1, 0.5, 0.9, 0.2])

    def reward(items, traces):
        if items[0].question in VAL:
            s = next(val_scores)
            return [s] * len(items)
        return _length_reward(items, traces)

    pol = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    res = run_grpo(_cfg(tmp_path, iterations=3, lora=False), pol, [GRPOItem(q) for q in QS], _pal, reward,
                   val_items=[GRPOItem(q) for q in VAL], sandbox=sandbox)
    assert [v["iteration"] for v in res.validation] == [0, 1, 2, 3]
    assert res.best_iteration == 2 and res.best_score == pytest.approx(0.9)
    ck = load_checkpoint(tmp_path / "grpo" / "best", load_torch_state=False)
    assert ck.step == 2
    final = dict(pol.model.named_parameters())
    assert all(torch.equal(final[n], t) for n, t in ck.tensors["policy"].items())


def test_flat_reward_alarm_stops_in_the_first_iterations(smol_tokenizer, tiny_model_factory, tmp_path, sandbox):
    pol = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    res = run_grpo(_cfg(tmp_path, iterations=10, lora=False, patience=2), pol, [GRPOItem(q, "999") for q in QS],
                   _pal, make_episode_reward(task="gsm8k"), sandbox=sandbox)
    assert res.stopped_by == "alarm" and res.iterations == 2
    assert "same reward" in res.alarm and "nothing to learn" in res.alarm
    assert [r["grpo/zero_std_frac"] for r in res.history] == [1.0, 1.0]
    assert [r["grpo/updated"] for r in res.history] == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_train_grpo_alarm_exit_and_bad_input(smol_tokenizer, tiny_model_factory, tmp_path, capsys):
    import json

    from ragloop.alignment.checkpoint import export_policy
    from ragloop.cli import main

    pdir = tmp_path / "tiny"
    export_policy(tiny_model_factory(seed=0), smol_tokenizer, pdir, name="tiny", manifest={})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": "999"}) + "\n" for q in QS + VAL))
    args = ["train", "grpo", "--policy", str(pdir), "--prompts", str(qa), "--out", str(tmp_path / "run"),
            "--iterations", "4", "--batch-questions", "2", "--samples", "2", "--max-tokens", "6", "--val-n", "2",
            "--eval-every", "1", "--full", "--lr", "1e-3", "--w-format", "0"]
    assert main(args) == 6  # TrainingError: the flat-reward alarm
    out, err = capsys.readouterr()
    assert "GRPO: 2 iterations" in out and "best validation at iteration 0" in out
    assert "GRPO stopped: every sample of every question got the same reward" in err
    assert (tmp_path / "run" / "policy" / "ragloop.json").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    noans = tmp_path / "noans.jsonl"
    noans.write_text(json.dumps({"question": "What is 2+2?"}) + "\n")
    assert main(["train", "grpo", "--policy", str(pdir), "--prompts", str(noans), "--out", str(tmp_path / "r2")]) == 2
    assert "have no 'answer'" in capsys.readouterr().err
    assert main([*args[:6], "--out", str(tmp_path / "r3"), "--samples", "1"]) == 2  # ConfigError, before loading
    assert "samples must be >= 2" in capsys.readouterr().err
    assert main([*args[:6], "--out", str(tmp_path / "r3"), "--val-n", "6"]) == 2
    assert "--val-n 6 leaves no training questions of 6" in capsys.readouterr().err


def test_bf16_rollouts_are_reweighted(smol_tokenizer, tiny_model_factory, tmp_path, sandbox):
    """Rollouts decoded with bf16 weights, trained in fp32: the recorded log-probs differ from the training
    forward's, and the loss uses the truncated weights (their mean is no longer exactly 1)."""
    pol = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    res = run_grpo(_cfg(tmp_path, lora=False, rollout_precision="bf16", tis_cap=2.0), pol,
                   [GRPOItem(q) for q in QS], _pal, _length_reward, sandbox=sandbox)
    row = res.history[-1]
    assert row["grpo/rollout_logprob_dev"] > 1e-4
    assert row["grpo/is_weight_mean"] != 1.0 and math.isfinite(row["grpo/is_weight_mean"])
    assert math.isfinite(row["grpo/loss"]) and row["grpo/updated"] == 1.0
