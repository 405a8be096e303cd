"""End-to-end smoke run of the improve loop on the tiny model with a 1-minute budget: the real PAL agent and
sandbox, the real GSM8K files, SFT → reward model (real MiniLM, frozen backbone) → PPO → eval; the summary and
the exported policy are checked."""

from __future__ import annotations

import json

from ragloop.alignment.improve import ImproveConfig, run_improve
from ragloop.core.trace import read_traces
from ragloop.models.local import LocalPolicy


def test_improve_smoke_one_minute(smol_tokenizer, tiny_model_factory, tmp_path):
    from ragloop.models.loading import load_policy

    policy = LocalPolicy.from_model(tiny_model_factory(seed=0), smol_tokenizer, name="tiny")
    cfg = ImproveConfig(out_dir=str(tmp_path / "improve"), budget_minutes=1.0, eval_n=4, max_new_tokens=24,
                        eval_batch=4, collect_questions=2, collect_samples=2, teacher_limit=24, rm_questions=2,
                        sft_batch=4, sft_max_length=320, sft_lr=1e-3, ppo_batch_prompts=2, ppo_samples=2,
                        ppo_max_iterations=2, general_n=2, min_stage_seconds=1.0,
                        reserve_seconds=2.0, budget_clock="wall", min_sft_minutes=0.05)
    summary = run_improve(cfg, policy=policy)
    out = tmp_path / "improve"
    on_disk = json.loads((out / "summary.json").read_text())
    for side in ("before", "after"):
        for key in ("accuracy", "ci95", "n", "format_valid"):
            assert key in on_disk[side]
        assert on_disk[side]["n"] == 4
    assert on_disk["policy"] and load_policy(on_disk["policy"]) is not None
    assert summary["stages"]["sft"]["steps"] >= 1
    assert "rm" in summary["stages"] and "ppo" in summary["stages"]
    assert summary["elapsed_minutes"] < 3.0
    assert summary["final_stage"] in ("sft+ppo", "sft") and summary["budget"]["per_stage"]["sft"] > 0
    assert summary["budget"]["used"] <= 1.05 * 1.0 + 0.1  # the tiny run's fixed costs (model loads) on top
    # every trace is saved, with critiques on the collected ones
    collected = read_traces(out / "traces" / "collect-start.jsonl")
    assert len(collected) == 4 and all(t.feedback.critiques for t in collected)
    assert len(read_traces(out / "traces" / "eval-after.jsonl")) == 4
    assert (out / "before_after.png").is_file() and (out / "sft" / "curves.png").is_file()
    assert "| accuracy" in (out / "table.md").read_text()


def test_teacher_continuation_is_exactly_what_the_agent_runs(tmp_path):
    """The SFT target for a teacher program, played back through the real PAL agent (the loop's own prompt
    settings and the real sandbox), must be a program that runs without any repair and returns the gold
    answer — the contract between the teacher data and the agent that evaluates the tuned model."""
    from ragloop.agents.sandbox import Sandbox
    from ragloop.alignment.data import gsm8k_answer_to_program, gsm8k_gold
    from ragloop.alignment.improve import default_data_dir, pal_factory, teacher_continuation
    from ragloop.eval.metrics import numeric_match
    from ragloop.models.scripted import ScriptedPolicy

    rows = [json.loads(x) for x in (default_data_dir() / "gsm8k" / "train.jsonl").open()][:12]
    make = pal_factory(ImproveConfig(out_dir=str(tmp_path)))
    sandbox, checked = Sandbox(), 0
    for r in rows:
        prog = gsm8k_answer_to_program(r["question"], r["answer"], comments=False)
        if prog is None:
            continue
        text = teacher_continuation(prog)
        trace = make(ScriptedPolicy([text]), sandbox).run(r["question"])
        assert trace.steps[0].repairs == [], (text, trace.steps[0].repairs)
        assert trace.finished and numeric_match(trace.answer, gsm8k_gold(r["answer"])) == 1.0, trace.steps[0]
        checked += 1
    assert checked >= 8
