"""The improve loop's budget plan, stage accounting and the ablation (issue 11 §1, §6).

The plan and the accounting are pure and checked on literal inputs (a fake clock); the ablation runs every
arm on the tiny model with the real PAL agent, sandbox and GSM8K files, with the validation scores forced by a
hook so that the choice of the final arm is known in advance."""

from __future__ import annotations

import json
import re

import pytest

from ragloop.alignment.improve import ARMS, ImproveConfig, run_improve
from ragloop.alignment.improve_budget import TRAINING_STAGES, StageClock, plan_budget
from ragloop.core.errors import UsageError
from ragloop.core.trace import read_traces
from ragloop.models.local import LocalPolicy

PLAN = dict(clock="cpu", val_n=50, collect_episodes=64, rm_collect_episodes=64, rm=True, sft_share=0.78,
            rm_share=0.07, rl_share=0.15, reserve_s=60.0)


def test_ablation_split_gives_every_arm_the_same_minutes():
    p = plan_budget(budget_s=3600, row_s=0.4, eval_n=150, rl="ppo", ablate=True, verifier_episodes=1200, **PLAN)
    # reserved: 4 evaluations x 150 + 4 validations x 50 + 128 collected + 1200 verifier episodes at 0.4 s,
    # 3 KL probes at 2 x 32 (the probe's cap) x 0.4 s, and the 60 s reserve
    assert p.reserved["evaluations"] == pytest.approx(240) and p.reserved["validation"] == pytest.approx(80)
    assert p.reserved["collection"] == pytest.approx(51.2) and p.reserved["verifier"] == pytest.approx(480)
    assert p.reserved["kl_forgetting"] == pytest.approx(3 * 2 * 32 * 0.4)
    assert p.train_s == pytest.approx(3600 - 240 - 80 - 51.2 - 480 - 76.8 - 60)
    s = 0.78
    assert p.arm_s == pytest.approx(p.train_s / (3 - 2 * s))
    assert p.sft_s == pytest.approx(s * p.arm_s)
    assert p.sft_continue_s == pytest.approx(p.arm_s - p.sft_s)
    assert p.rm_s + p.rl_s == pytest.approx(p.sft_continue_s)  # each RL arm: reward model + RL = the SFT continuation
    # the compute the arms use fits the training time (the reward model is trained once)
    assert p.sft_s + p.sft_continue_s + p.rm_s + 2 * p.rl_s <= p.train_s + 1e-6
    assert p.train_share >= 0.6
    assert "every arm trains" in p.describe()


def test_plan_refuses_up_front_with_what_to_change():
    # the run: 20 minutes, two evaluations of 300 questions at 1.5 s each leave SFT nothing useful
    kw = dict(budget_s=1200, row_s=1.5, rl="ppo", ablate=False, **PLAN)
    with pytest.raises(UsageError) as e:
        plan_budget(eval_n=300, **kw)
    msg = str(e.value)
    assert "20-min budget" in msg and "evaluations of 300 questions" in msg
    need = int(re.search(r"raise --budget-minutes to at least (\d+)", msg).group(1))
    n_max = int(re.search(r"lower --eval-n to (\d+)", msg).group(1))
    # both suggestions are enough, and just below them is not
    assert plan_budget(eval_n=300, **{**kw, "budget_s": need * 60}).train_share >= 0.6
    assert plan_budget(eval_n=n_max, **kw).sft_s >= 120
    with pytest.raises(UsageError):
        plan_budget(eval_n=300, **{**kw, "budget_s": (need - 1) * 60})
    with pytest.raises(UsageError):
        plan_budget(eval_n=n_max + 1, **kw)
    # a re-plan once part of the budget is spent warns instead of refusing
    late = plan_budget(eval_n=300, strict=False, **kw)
    assert late.warning.startswith("SFT would get") and "raise --budget-minutes" in late.warning
    assert plan_budget(eval_n=n_max, strict=False, **kw).warning is None


def test_stage_clock_accounts_on_a_fake_clock():
    ticks = iter([0.0, 0.0, 30.0, 30.0, 150.0, 160.0, 170.0, 200.0, 630.0, 640.0])
    sc = StageClock(lambda: next(ticks))  # t0 = 0
    with sc.stage("baseline_eval"):  # 0 -> 30
        pass
    with sc.stage("sft"):  # 30 -> 150
        pass
    with sc.stage("kl_forgetting"):  # 160 -> 170 (10 s between stages is overhead)
        pass
    with sc.stage("eval_after"):  # 200 -> 630
        pass
    r = sc.report(asked_s=600, clock="cpu")  # used: 640 s
    assert r["per_stage"] == {"baseline_eval": 0.5, "sft": 2.0, "kl_forgetting": round(10 / 60, 3), "eval_after": round(430 / 60, 3)}
    assert r["used"] >= sum(r["per_stage"].values())
    assert r["training_minutes"] == 2.0 and r["clock"] == "cpu" and r["asked"] == 10.0
    assert r["within_tolerance"] is False  # 640 s used of 600 asked: over 5%
    ok = StageClock(iter([0.0, 620.0]).__next__).report(asked_s=600, clock="wall")
    assert ok["within_tolerance"] is True and ok["used"] == pytest.approx(620 / 60, abs=1e-3)


def _tiny_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), budget_minutes=1.0, eval_n=4, val_n=4, max_new_tokens=24, eval_batch=4,
                collect_questions=2, collect_samples=2, teacher_limit=24, rm_questions=2, sft_batch=4,
                sft_max_length=320, sft_lr=1e-3, ppo_batch_prompts=2, ppo_samples=2, ppo_max_iterations=2,
                grpo_batch_questions=2, grpo_samples=2, grpo_max_iterations=2, grpo_eval_every=1, general_n=2,
                min_stage_seconds=1.0, reserve_seconds=6.0, min_sft_minutes=0.05, budget_clock="cpu",
                verifier_samples=4)
    return ImproveConfig(**{**base, **kw})


def test_refused_before_training(smol_tokenizer, tiny_model_factory, tmp_path):
    policy = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    cfg = _tiny_cfg(tmp_path, budget_minutes=0.05, min_sft_minutes=2.0, ablate=True)
    with pytest.raises(UsageError, match=r"SFT would get .*raise --budget-minutes to at least"):
        run_improve(cfg, policy=policy)
    out = tmp_path / "run"
    assert not (out / "sft_branch").exists() and not (out / "summary.json").exists()


def test_ablation_runs_every_arm_and_chooses_on_validation(smol_tokenizer, tiny_model_factory, tmp_path):
    from ragloop.models.loading import load_policy

    policy = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    forced = {"start": 0.0, "sft": 0.25, "sft+grpo": 0.75, "sft+ppo": 0.5}  # the tiny model scores 0 everywhere
    seen = []

    def hook(arm, s):
        seen.append(arm)
        return {**s, "accuracy": forced[arm]}

    lines = []
    summary = run_improve(_tiny_cfg(tmp_path, ablate=True), policy=policy, progress=lines.append,
                          hooks={"validation": hook})
    out = tmp_path / "run"
    on_disk = json.loads((out / "summary.json").read_text())
    assert seen == list(ARMS)
    # every arm, with the fields the table promises; the verifier row was run (a reward model was trained)
    abl = on_disk["ablation"]
    for arm in ARMS:
        for key in ("accuracy", "ci95", "n", "format_valid", "kl_to_start", "general_nll", "minutes", "val_accuracy"):
            assert key in abl[arm], (arm, key)
        assert abl[arm]["n"] == 4 and abl[arm]["val_accuracy"] == forced[arm]
    assert abl["start"]["kl_to_start"] == 0.0 and abl["sft"]["kl_to_start"] > 0
    vrow = abl["sft+grpo + verifier@4"]
    assert vrow["n"] == 4 and 0.0 <= vrow["accuracy"] <= vrow["pass_at_n"] <= 1.0
    assert len(read_traces(out / "traces" / "verifier-samples.jsonl")) == 16
    # the final arm is the one best on validation, and `after` / `policy` are that arm's
    assert on_disk["final_stage"] == "sft+grpo"
    assert on_disk["policy"] == abl["sft+grpo"]["policy"] and load_policy(on_disk["policy"]) is not None
    assert on_disk["after"]["accuracy"] == abl["sft+grpo"]["accuracy"]
    table = (out / "table.md").read_text()
    assert "| sft+grpo (final) |" in table and all(f"| {a}" in table for a in ARMS) and "verifier@4" in table
    # the validation slice: train.jsonl rows held out from collection, teacher SFT rows, RM pairs and RL prompts
    val_q = {json.loads(x)["question"] for x in open(out / "traces" / "val-start.jsonl")}
    assert len(val_q) == 4 and on_disk["validation"]["n"] == 4
    trained = set()
    for name in ("collect-start", "collect-sft", "teacher"):
        trained |= {t.question for t in read_traces(out / "traces" / f"{name}.jsonl")}
    assert trained and not (trained & val_q)
    test_q = {t.question for t in read_traces(out / "traces" / "eval-before.jsonl")}
    assert not (test_q & val_q)
    assert on_disk["stages"]["grpo"]["validation"][0]["iteration"] == 0  # GRPO's keep-best ran on validation
    # budget: per-stage minutes add up to at most what was used; used within the budget's 5% (+ rounding and
    # the tiny run's fixed costs, which a real budget dwarfs)
    b = on_disk["budget"]
    assert b["clock"] == "cpu" and b["asked"] == 1.0
    assert sum(b["per_stage"].values()) <= b["used"] + 1e-3 * len(b["per_stage"])
    assert b["used"] <= 1.05 * b["asked"] + 0.1
    assert {"sft_branch", "sft_continue", "rm", "grpo", "ppo"} <= set(b["per_stage"]) <= set(TRAINING_STAGES) | {
        "baseline_eval", "collect", "validation", "eval_sft", "eval_sft_grpo", "eval_sft_ppo", "kl_forgetting",
        "collect_rm", "verifier"}
    assert b["training_minutes"] > 0.5 * b["used"]
    assert any(x.startswith("plan: ") and "every arm trains" in x for x in lines)
    assert any(x.startswith("[sft_branch] step") and "min left" in x for x in lines)
    assert summary["final_stage"] == "sft+grpo"


def test_cli_rl_and_ablate_bad_input(tmp_path, capsys):
    from ragloop.cli import main

    out = str(tmp_path / "i")
    assert main(["improve", "--rl", "dpo", "--out", out]) == 2
    assert "unknown RL stage 'dpo'" in capsys.readouterr().err
    assert main(["improve", "--no-ppo", "--rl", "grpo", "--out", out]) == 2
    assert "--no-ppo and --rl grpo contradict" in capsys.readouterr().err
    assert main(["improve", "--ablate", "--task", "scifact-react", "--out", out]) == 2
    assert "--ablate is for --task gsm8k-pal" in capsys.readouterr().err
    assert main(["improve", "--ablate", "--task", "custom", "--questions", str(tmp_path / "q.jsonl"), "--out", out]) == 2
    assert "--ablate is for --task gsm8k-pal" in capsys.readouterr().err
    assert ImproveConfig(out_dir=out, ppo=False).rl == "none"  # --no-ppo, as before


def test_rl_grpo_stage_keeps_best_on_validation(smol_tokenizer, tiny_model_factory, tmp_path):
    policy = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    summary = run_improve(_tiny_cfg(tmp_path, rl="grpo", budget_minutes=0.7, verifier_samples=0), policy=policy)
    g = summary["stages"]["grpo"]
    assert g["iterations"] >= 1 and g["validation"] and g["validation"][0]["iteration"] == 0
    # the final stage follows GRPO's keep-best (iteration 0 = the SFT weights won on validation)
    assert summary["final_stage"] == ("sft" if g["best_iteration"] == 0 else "sft+grpo")
    assert summary["policy"] == g["policy"]
    assert "ppo" not in summary["stages"] and summary["budget"]["per_stage"]["grpo"] > 0
    assert summary["validation"]["n"] == 4 and len(summary["validation"]["rows"]) == 4
