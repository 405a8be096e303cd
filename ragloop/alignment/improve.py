"""``ragloop improve``: the whole loop — the agents' own traces make the same local model a better agent.

For GSM8K with PAL (Gao et al. 2023):

1. baseline: greedy PAL on a fixed held-out slice of ``test_dev300.jsonl`` (first ``eval_n`` rows);
2. collect: sample several programs per training question with the starting policy (traces);
3. filter + critique: keep correct, well-formed traces with no injection flag; every trace gets programmatic
   critiques (does the program run, does it answer the question asked, is its context clean);
4. SFT on the kept traces plus teacher programs converted mechanically from the calculator annotations of
   ``train.jsonl`` (Cobbe et al. 2021) — in exactly the prompt format the agent runs with;
5. reward model on preference pairs: correct vs incorrect samples of the same question (after SFT), and
   teacher programs vs incorrect samples;
6. PPO from the SFT policy with a programmatic reward (the program's answer is right / it ran / no program)
   plus the reward model's score, KL-leashed to the SFT model;
7. evaluate again on the same slice; write the before/after table (accuracy with Wilson 95% CI, format
   validity, mean steps/tokens, KL to the starting model, forgetting on a held-out general set), the curves
   and every trace, and ``summary.json``.

Budget: ``budget_minutes`` of wall time on this machine for the whole loop, evaluations included. The final
evaluation's time is reserved from the start (estimated from the baseline's); the training stages share
what is left in the ``*_share`` proportions, each stopping at its deadline after a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragloop.alignment.budget import make_clock
from ragloop.alignment.collect import run_agent_batched, score_gsm8k, summarize
from ragloop.alignment.data import (
    DropReport,
    PreferencePair,
    SFTRow,
    filter_traces,
    gsm8k_answer_to_program,
    gsm8k_gold,
    hh_transcript_to_messages,
    outcome_pairs,
    program_body,
    trace_prompt_text,
    trace_response_text,
    traces_to_sft_rows,
)
from ragloop.core.errors import ConfigError, DataError, TrainingError, UsageError
from ragloop.core.trace import Feedback, Message, Trace, write_traces
from ragloop.models.types import GenerationConfig

log = logging.getLogger(__name__)

TASKS = ("gsm8k-pal", "scifact-react")  # scifact-react: ragloop.alignment.improve_react


def default_data_dir() -> Path:
    """``$RAGLOOP_DATA`` or ``<repo>/../shared/data`` (data are read in place, never copied)."""
    env = os.environ.get("RAGLOOP_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@dataclass
class ImproveConfig:
    """Settings of the improve loop; the defaults are the 60-minute GSM8K-PAL run on the embedded model."""

    out_dir: str
    task: str = "gsm8k-pal"
    policy: str | None = None  # policy spec (None = the embedded SmolLM2-135M-Instruct)
    budget_minutes: float = 60.0
    budget_clock: str = "cpu"  # "cpu": machine-minutes (CPU time ÷ threads, budget.py); "wall": wall time
    seed: int = 0
    data_dir: str | None = None
    eval_n: int = 150  # first rows of test_dev300.jsonl: the held-out slice, the same before and after
    shots: int = 0  # PAL exemplars in the prompt (0: the question and the prefilled `def solution():`)
    max_new_tokens: int = 96  # teacher program bodies: median 45 tokens, 95th percentile 85
    eval_batch: int = 16
    collect_questions: int = 16  # training questions sampled with the starting policy
    collect_samples: int = 4  # samples per question
    collect_temperature: float = 0.8
    teacher: bool = True  # add teacher programs converted from train.jsonl annotations
    teacher_limit: int | None = None  # at most this many teacher rows (None = all that convert)
    sft_method: str = "full"  # "full" | "lora"
    sft_lr: float | None = 1e-4  # full fine-tuning of a 135M model on a new format: short run, higher lr
    sft_batch: int = 8
    sft_max_length: int = 384
    sft_bf16: bool | None = None  # bf16 autocast; None: only where the CPU does bf16 natively (models.cpu)
    rm: bool = True
    rm_questions: int = 16  # training questions sampled with the SFT policy for preference pairs
    rm_freeze_backbone: bool = True
    ppo: bool = True
    ppo_batch_prompts: int = 8
    ppo_samples: int = 2
    ppo_lr: float = 5e-5
    ppo_kl_coef: float = 0.05
    ppo_max_iterations: int = 200
    rm_weight: float = 0.25  # weight of the (clipped) reward-model score in the PPO reward
    sft_share: float = 0.78  # of the training time left after evaluations and collection
    rm_share: float = 0.07
    ppo_share: float = 0.15
    general_n: int = 16  # held-out general chat rows (HH chosen dialogues) for the forgetting probe
    min_stage_seconds: float = 5.0
    reserve_seconds: float = 60.0  # kept free at the end besides the final evaluation (KL, table, plots)
    index: str = "scifact"  # scifact-react: the SciFact corpus index (name or path)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"unknown task {self.task!r}; available: {', '.join(TASKS)}",
                             hint=f"use --task {' or --task '.join(TASKS)}")
        if self.budget_minutes <= 0:
            raise ConfigError("budget_minutes must be > 0")
        if self.eval_n < 1 or self.collect_samples < 1:
            raise ConfigError("eval_n and collect_samples must be >= 1")
        if self.budget_clock not in ("wall", "cpu"):
            raise ConfigError("budget_clock must be 'wall' or 'cpu'")
        if self.sft_method not in ("full", "lora"):
            raise ConfigError("sft_method must be 'full' or 'lora'")


@dataclass
class _Clock:
    budget: float
    now: Callable[[], float]
    t0: float

    def elapsed(self) -> float:
        return self.now() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="set RAGLOOP_DATA or --data-dir to the shared data folder")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def pal_factory(cfg: ImproveConfig) -> Callable[[Any, Any], Any]:
    from ragloop.agents.pal import PALAgent, PALConfig

    def make(policy: Any, sandbox: Any) -> Any:
        return PALAgent(policy, PALConfig(shots=cfg.shots, max_new_tokens=cfg.max_new_tokens, prompt_style="raw",
                                          prefill=True, seed=cfg.seed), sandbox=sandbox)

    return make


def agent_prompts(make_agent: Callable[[Any, Any], Any], policy: Any, questions: Sequence[str]) -> list[Any]:
    """The exact prompt the agent sends for each question (its first model call; nothing decoded)."""
    from ragloop.agents.runtime import first_call

    agent = make_agent(policy, None)
    out = []
    for q in questions:
        call = first_call(agent, q)
        if call is None:
            raise UsageError(f"the agent made no model call for {q[:60]!r}")
        out.append(call.prompt)
    return out


def critique_trace(trace: Trace) -> Trace:
    """Programmatic critiques under three of the constitution's principles, recorded on the trace."""
    from ragloop.alignment.data import format_valid

    ran = format_valid(trace)
    crit = [
        {"principle": "program-runs", "ok": ran,
         "critique": "the program ran and returned a value" if ran else
         (trace.steps[-1].error if trace.steps and trace.steps[-1].error else "no program was found")},
        {"principle": "answers-the-question", "ok": bool(trace.feedback.correct),
         "critique": "the returned value equals the reference answer" if trace.feedback.correct else
         f"the returned value {trace.answer!r} is not the reference answer"},
        {"principle": "no-injected-instructions", "ok": not trace.injection_flags,
         "critique": "no instruction-like text in the context" if not trace.injection_flags else
         f"context tripped: {', '.join(trace.injection_flags)}"},
    ]
    trace.feedback.critiques.extend(crit)
    return trace


def teacher_continuation(program: str) -> str:
    """What the model should write after PAL's prefilled prompt for this teacher ``program``: the prompt ends
    right after the docstring's closing quotes, so the continuation is a newline, then the body. (Without the
    newline the model learns to write the body on the docstring's line, which is a syntax error.)"""
    return "\n" + program_body(program)


def teacher_traces(rows: Sequence[dict[str, Any]], prompts: Sequence[Any], *, policy_name: str) -> tuple[list[Trace], DropReport]:
    """Teacher traces: the agent's prompt for the question, and the body of the program converted from the
    answer's calculator annotations as the model's continuation (it is trainable: the target to imitate)."""
    report = DropReport()
    out: list[Trace] = []
    for r, prompt in zip(rows, prompts, strict=True):
        report.read += 1
        prog = gsm8k_answer_to_program(r["question"], r["answer"], comments=False)
        if prog is None:
            report.drop("not_convertible")
            continue
        body = teacher_continuation(prog)
        out.append(Trace(agent="pal", task="gsm8k", question=r["question"], policy=f"teacher:{policy_name}",
                         messages=[Message(role="user", content=prompt if isinstance(prompt, str) else str(prompt)),
                                   Message(role="assistant", content=body)],
                         answer=gsm8k_gold(r["answer"]), finished=True,
                         feedback=Feedback(correct=True, gold=gsm8k_gold(r["answer"])),
                         meta={"prompt_style": "raw", "source": "gsm8k-teacher"}))
        report.kept += 1
    return out, report


def kl_to_reference(policy: Any, ref_model: Any, traces: Sequence[Trace], *, max_traces: int = 64) -> float:
    """Mean per-token KL(π ‖ π_start) of the full next-token distributions along the policy's own eval
    completions (nats/token)."""
    import torch

    from ragloop.alignment.ppo import build_episode_batch

    pairs = [(policy.encode(t.messages[0].content), policy.tokenize(t.messages[-1].content))
             for t in traces[:max_traces] if len(t.messages) >= 2 and t.messages[-1].role == "assistant"]
    pairs = [(p, r) for p, r in pairs if r]
    if not pairs:
        return float("nan")
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(pairs), 8):
            chunk = pairs[s : s + 8]
            b = build_episode_batch([p for p, _ in chunk], [r for _, r in chunk], policy.pad_id)
            P, L = b.prompt_width, b.resp_mask.shape[1]
            kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            from ragloop.models.decoding import position_ids_from_mask

            kw["position_ids"] = position_ids_from_mask(b.attention_mask)
            lp = torch.log_softmax(policy.model(**kw).logits[:, P - 1 : P + L - 1].float(), -1)  # (B, L, V)
            lq = torch.log_softmax(ref_model(**kw).logits[:, P - 1 : P + L - 1].float(), -1)  # (B, L, V)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # (B, L)
            total += float((kl * b.resp_mask).sum())
            count += int(b.resp_mask.sum())
    return total / max(1, count)


def _table(before: dict[str, Any], after: dict[str, Any], extra: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def ci(c: Sequence[float]) -> str:
        return f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"

    rows = [
        ("accuracy", pct(before["accuracy"]), pct(after["accuracy"])),
        ("95% CI (Wilson)", ci(before["ci95"]), ci(after["ci95"])),
        ("correct / n", f"{before['correct']} / {before['n']}", f"{after['correct']} / {after['n']}"),
        ("format valid", pct(before["format_valid"]), pct(after["format_valid"])),
        ("mean steps", f"{before['mean_steps']:.2f}", f"{after['mean_steps']:.2f}"),
        ("mean tokens out", f"{before['mean_tokens_out']:.1f}", f"{after['mean_tokens_out']:.1f}"),
        ("KL to start (nats/token)", "0", f"{extra.get('kl_to_start', float('nan')):.4f}"),
        ("general-set NLL (forgetting)", f"{extra.get('general_nll_before', float('nan')):.4f}",
         f"{extra.get('general_nll_after', float('nan')):.4f}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'metric':<{w}} | before | after |", f"|{'-' * (w + 2)}|--------|-------|"]
    lines += [f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def run_improve(cfg: ImproveConfig, *, policy: Any = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the loop; returns the summary (also written to ``<out>/summary.json``). ``policy`` may be passed
    in (tests use the tiny model); otherwise ``cfg.policy`` is loaded. ``task="scifact-react"`` runs
    ``ragloop.alignment.improve_react`` with this config's shared settings."""
    import copy

    if cfg.task == "scifact-react":
        from ragloop.alignment.improve_react import ReactImproveConfig, run_improve_react

        rcfg = ReactImproveConfig(out_dir=cfg.out_dir, policy=cfg.policy, index=cfg.index,
                                  budget_minutes=cfg.budget_minutes, budget_clock=cfg.budget_clock, seed=cfg.seed,
                                  data_dir=cfg.data_dir, eval_n=cfg.eval_n, sft_method=cfg.sft_method)
        return run_improve_react(rcfg, policy=policy, progress=progress)

    import torch

    from ragloop.agents.sandbox import Sandbox
    from ragloop.alignment.sft import SFTConfig, mean_nll, run_sft

    now = make_clock(cfg.budget_clock)
    clock = _Clock(cfg.budget_minutes * 60.0, now, now())
    wall0 = time.perf_counter()
    say = progress or (lambda msg: log.info(msg))
    out = Path(cfg.out_dir)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    eval_rows = _read_jsonl(data / "gsm8k" / "test_dev300.jsonl", cfg.eval_n)
    train_rows = _read_jsonl(data / "gsm8k" / "train.jsonl")
    if policy is None:
        from ragloop.models.loading import load_policy

        policy = load_policy(cfg.policy)
    start_name = policy.name
    ref_model = copy.deepcopy(policy.model).eval()  # the starting model: KL and forgetting are measured against it
    make = pal_factory(cfg)
    sandbox = Sandbox()
    stages: dict[str, Any] = {}
    rng = random.Random(cfg.seed)
    order = list(range(len(train_rows)))
    rng.shuffle(order)  # training questions: a seeded shuffle; disjoint subsets per stage
    collect_idx = order[: cfg.collect_questions]
    rm_idx = order[cfg.collect_questions : cfg.collect_questions + cfg.rm_questions]
    teacher_idx = order[cfg.collect_questions + cfg.rm_questions :]
    if cfg.teacher_limit is not None:
        teacher_idx = teacher_idx[: cfg.teacher_limit]

    def evaluate(tag: str) -> tuple[dict[str, Any], list[Trace]]:
        t0, c0 = time.perf_counter(), now()
        traces = [ts[0] for ts in run_agent_batched(make, policy, [r["question"] for r in eval_rows], sandbox=sandbox,
                                                    batch_size=cfg.eval_batch, task="gsm8k")]
        for t, r in zip(traces, eval_rows, strict=True):
            score_gsm8k(t, gsm8k_gold(r["answer"]))
        write_traces(out / "traces" / f"eval-{tag}.jsonl", traces)
        s = summarize(traces, seconds=time.perf_counter() - t0).to_dict()
        s["policy"] = policy.name
        s["budget_seconds"] = round(now() - c0, 1)
        say(f"eval ({tag}): {s['correct']}/{s['n']} correct ({100 * s['accuracy']:.1f}%), "
            f"format valid {100 * s['format_valid']:.1f}%, {s['seconds']:.0f} s")
        return s, traces

    def sample(idx: Sequence[int], tag: str) -> list[Trace]:
        qs = [train_rows[i]["question"] for i in idx]
        if not qs:
            return []
        dec = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.collect_temperature, top_p=0.95,
                               seed=cfg.seed + len(tag))
        groups = run_agent_batched(make, policy, qs, samples=cfg.collect_samples, decoding=dec, sandbox=sandbox,
                                   batch_size=max(1, cfg.eval_batch // cfg.collect_samples), task="gsm8k")
        traces = []
        for i, ts in zip(idx, groups, strict=True):
            for t in ts:
                traces.append(critique_trace(score_gsm8k(t, gsm8k_gold(train_rows[i]["answer"]))))
        write_traces(out / "traces" / f"collect-{tag}.jsonl", traces)
        k = sum(1 for t in traces if t.feedback.correct)
        say(f"collect ({tag}): {len(traces)} traces, {k} correct")
        return traces

    # 1. baseline ---------------------------------------------------------------------------------------
    before, _ = evaluate("before")
    eval_seconds = before["budget_seconds"]
    stages["baseline_eval_s"] = eval_seconds
    # 2-3. collect with the starting policy, filter, critique --------------------------------------------
    t0 = now()
    collected = sample(collect_idx, "start")
    filt = DropReport()
    kept = filter_traces(collected, report=filt)
    stages["collect_s"] = now() - t0
    stages["filter"] = filt.to_dict()
    # 4. SFT ----------------------------------------------------------------------------------------------
    # the final evaluation costs at most the baseline's (same prompts, at most as many tokens: the starting
    # model tends to run to the token limit) plus sandbox runs of the programs that now parse
    reserve = eval_seconds + cfg.reserve_seconds
    rm_collect_guess = eval_seconds * cfg.rm_questions * cfg.collect_samples / max(1, len(eval_rows)) if cfg.rm else 0
    train_time = max(0.0, clock.left() - reserve - rm_collect_guess)
    rows: list[SFTRow] = []
    self_rows, _ = traces_to_sft_rows(kept)
    rows += [r.model_copy(update={"source": "self"}) for r in self_rows]
    if cfg.teacher:
        t_rows = [train_rows[i] for i in teacher_idx]
        prompts = agent_prompts(make, policy, [r["question"] for r in t_rows])
        teach, trep = teacher_traces(t_rows, prompts, policy_name=start_name)
        stages["teacher"] = trep.to_dict()
        write_traces(out / "traces" / "teacher.jsonl", teach)
        t_sft, _ = traces_to_sft_rows(teach)
        rows += [r.model_copy(update={"source": "teacher"}) for r in t_sft]
    general = _general_rows(data, cfg.general_n)
    sft_budget = max(cfg.min_stage_seconds, cfg.sft_share * train_time)
    say(f"SFT on {len(rows)} rows ({len(self_rows)} own correct traces), budget {sft_budget / 60:.1f} min")
    sft_cfg = SFTConfig(out_dir=str(out / "sft"), method=cfg.sft_method, lr=cfg.sft_lr, batch_size=cfg.sft_batch,
                        max_length=cfg.sft_max_length, bf16=_sft_bf16(cfg.sft_bf16), seed=cfg.seed, budget_seconds=sft_budget,
                        save_every=100, warmup_steps=5, name=f"{start_name}-sft", epochs=1,
                        budget_clock=cfg.budget_clock)
    sft_res = run_sft(sft_cfg, policy, _shuffled(rows, cfg.seed), general_rows=general)
    policy.name = f"{start_name}-sft"
    stages["sft"] = {"steps": sft_res.steps, "final_loss": sft_res.final_loss, "stopped_by": sft_res.stopped_by,
                     "tokens_per_s": sft_res.tokens_per_second, "rows": len(rows), "policy": str(sft_res.policy_dir),
                     "data": sft_res.data_report}
    final_policy_dir = sft_res.policy_dir
    # 5. reward model -------------------------------------------------------------------------------------
    rm_model = None
    if cfg.rm and clock.left() > reserve + 2 * cfg.min_stage_seconds:
        t0 = now()
        rm_traces = sample(rm_idx, "sft")
        pairs = outcome_pairs(rm_traces + collected)
        gold_programs = {train_rows[i]["question"]: train_rows[i]["answer"] for i in rm_idx + collect_idx}
        for t in rm_traces + collected:  # the teacher's program over the model's wrong program
            prog = gsm8k_answer_to_program(t.question, gold_programs[t.question], comments=False)
            if prog is not None and not t.feedback.correct and trace_response_text(t):
                pairs.append(PreferencePair(prompt=trace_prompt_text(t), chosen=teacher_continuation(prog),
                                            rejected=trace_response_text(t)))
        stages["rm_pairs"] = len(pairs)
        if len(pairs) >= 4:
            from ragloop.alignment.reward import RewardConfig, train_reward_model

            rm_budget = max(cfg.min_stage_seconds, cfg.rm_share * train_time)
            rm_res = train_reward_model(RewardConfig(out_dir=str(out / "rm"), freeze_backbone=cfg.rm_freeze_backbone,
                                                     epochs=20 if cfg.rm_freeze_backbone else 1, seed=cfg.seed,
                                                     budget_seconds=rm_budget, test_fraction=0.2,
                                                     budget_clock=cfg.budget_clock), pairs)
            stages["rm"] = rm_res.to_dict()
            from ragloop.alignment.reward import load_reward_model

            rm_model = load_reward_model(rm_res.model_dir)
            say(f"reward model: {len(pairs)} pairs, held-out accuracy {rm_res.test_accuracy:.3f}")
        stages["rm_s"] = now() - t0
    # 6. PPO ------------------------------------------------------------------------------------------------
    ppo_budget = clock.left() - reserve
    if cfg.ppo and ppo_budget > cfg.min_stage_seconds:
        from ragloop.alignment.ppo import PPOConfig, PPOItem, make_reward_fn, run_ppo

        ppo_idx = rm_idx + collect_idx
        ppo_rows = [train_rows[i] for i in ppo_idx]
        ppo_prompts = agent_prompts(make, policy, [r["question"] for r in ppo_rows])
        items = [PPOItem(prompt=p, meta={"question": r["question"], "gold": gsm8k_gold(r["answer"])})
                 for p, r in zip(ppo_prompts, ppo_rows, strict=True)]
        check = pal_reward_check(make, policy, sandbox)
        reward_fn = make_reward_fn(check=check, reward_model=rm_model, rm_weight=cfg.rm_weight if rm_model else 0.0,
                                   rm_prompt=lambda it: it.meta["question"], rm_clip=3.0)
        stops = make(policy, sandbox)._decoding().stop  # the agent's own stop strings
        say(f"PPO from the SFT policy, budget {ppo_budget / 60:.1f} min")
        ppo_cfg = PPOConfig(out_dir=str(out / "ppo"), iterations=cfg.ppo_max_iterations,
                            batch_prompts=cfg.ppo_batch_prompts, samples_per_prompt=cfg.ppo_samples,
                            max_new_tokens=cfg.max_new_tokens, stop=stops, lr=cfg.ppo_lr, kl_coef=cfg.ppo_kl_coef,
                            seed=cfg.seed, budget_seconds=ppo_budget, name=f"{start_name}-ppo", minibatch_size=4,
                            budget_clock=cfg.budget_clock)
        try:
            ppo_res = run_ppo(ppo_cfg, policy, items, reward_fn)
        except TrainingError as e:  # PPO diverged beyond its rollbacks: keep the SFT policy and say so
            say(f"PPO stopped: {e.message}; evaluating the SFT policy instead")
            stages["ppo"] = {"failed": e.message}
            from ragloop.models.loading import load_policy

            sft_policy = load_policy(sft_res.policy_dir)
            policy.model, policy.name = sft_policy.model, sft_policy.name
        else:
            policy.name = f"{start_name}-ppo"
            last = ppo_res.history[-1] if ppo_res.history else {}
            stages["ppo"] = {"iterations": ppo_res.iterations, "rollbacks": ppo_res.rollbacks,
                             "stopped_by": ppo_res.stopped_by,
                             "reward_first": ppo_res.history[0].get("env/reward_mean") if ppo_res.history else None,
                             "reward_last": last.get("env/reward_mean"), "kl_last": last.get("objective/kl"),
                             "policy": str(ppo_res.policy_dir)}
            final_policy_dir = ppo_res.policy_dir
    # 7. evaluate again ----------------------------------------------------------------------------------
    after, after_traces = evaluate("after")
    extra = {"kl_to_start": kl_to_reference(policy, ref_model, after_traces)}
    if general:
        from ragloop.alignment.masking import tokenize_rows

        gex, _ = tokenize_rows(general, policy.render, policy.tokenizer, max_length=cfg.sft_max_length)
        extra["general_nll_before"] = mean_nll(ref_model, gex, policy.pad_id)
        extra["general_nll_after"] = mean_nll(policy.model, gex, policy.pad_id)
    del ref_model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    summary = {
        "task": cfg.task, "slice": f"gsm8k/test_dev300.jsonl rows 0-{len(eval_rows) - 1}",
        "before": before, "after": after, **extra,
        "policy": str(final_policy_dir) if final_policy_dir else None,
        "start_policy": start_name, "budget_minutes": cfg.budget_minutes, "budget_clock": cfg.budget_clock,
        "elapsed_minutes": round(clock.elapsed() / 60, 2),
        "wall_minutes": round((time.perf_counter() - wall0) / 60, 2), "stages": stages, "config": asdict(cfg),
    }
    table = _table(before, after, extra)
    summary["table"] = table
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    _plot_summary(out, before, after)
    return summary


def evaluate_slice(cfg: ImproveConfig, *, tag: str, policy: Any = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The loop's held-out evaluation on its own: the same slice (first ``cfg.eval_n`` rows of
    ``test_dev300.jsonl``), the same PAL agent settings, batched greedy decoding and the sandbox — for a
    checkpoint written by a run, or the start model. Writes ``<out>/traces/eval-<tag>.jsonl`` and
    ``<out>/eval-<tag>.json``; returns the summary (accuracy, ci95, n, format_valid, …)."""
    from ragloop.agents.sandbox import Sandbox
    from ragloop.alignment.collect import run_agent_batched, score_gsm8k, summarize

    if cfg.task != "gsm8k-pal":
        raise UsageError("--evaluate-only is for --task gsm8k-pal",
                         hint="for scifact-react use ragloop eval claims with the loop's settings")
    if not tag or not all(c.isalnum() or c in "-_." for c in tag):
        raise UsageError(f"bad evaluation tag {tag!r}", hint="use letters, digits, '-', '_' or '.'")
    out = Path(cfg.out_dir)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    rows = _read_jsonl(data / "gsm8k" / "test_dev300.jsonl", cfg.eval_n)
    if policy is None:
        from ragloop.models.loading import load_policy

        policy = load_policy(cfg.policy)
    t0 = time.perf_counter()
    traces = [ts[0] for ts in run_agent_batched(pal_factory(cfg), policy, [r["question"] for r in rows],
                                                sandbox=Sandbox(), batch_size=cfg.eval_batch, task="gsm8k")]
    for t, r in zip(traces, rows, strict=True):
        score_gsm8k(t, gsm8k_gold(r["answer"]))
    write_traces(out / "traces" / f"eval-{tag}.jsonl", traces)
    s = summarize(traces, seconds=time.perf_counter() - t0).to_dict()
    s.update(policy=policy.name, policy_spec=cfg.policy, slice=f"gsm8k/test_dev300.jsonl rows 0-{len(rows) - 1}",
             strict_format_valid=sum(1 for t in traces if t.finished and not any(st.repairs for st in t.steps))
             / max(1, len(traces)))
    (out / f"eval-{tag}.json").write_text(json.dumps(s, indent=1, default=str), encoding="utf-8")
    if progress:
        progress(f"eval ({tag}): {s['correct']}/{s['n']} correct ({100 * s['accuracy']:.1f}%), "
                 f"format valid {100 * s['format_valid']:.1f}%, {s['seconds']:.0f} s")
    return s


def pal_reward_check(make_agent: Callable[[Any, Any], Any], policy: Any, sandbox: Any) -> Callable[[Any, str], float]:
    """The programmatic PPO reward for a PAL completion: 1 if the program's answer is right, −0.2 if it ran
    but is wrong, −1 if no program ran — judged by the agent itself (same extraction, same sandbox)."""
    from ragloop.agents.runtime import replay
    from ragloop.eval.metrics import numeric_match
    from ragloop.models.types import Generation

    agent = make_agent(policy, sandbox)

    def check(item: Any, completion: str) -> float:
        t = replay(agent, item.meta["question"], [[Generation(text=completion, token_ids=[], finish_reason="stop")]])
        if t.answer is not None and numeric_match(t.answer, item.meta["gold"]) == 1.0:
            return 1.0
        return -0.2 if t.finished else -1.0

    return check


def _general_rows(data: Path, n: int) -> list[SFTRow]:
    """A held-out general chat set for the forgetting probe: the first ``n`` HH harmless-base *chosen*
    dialogues (never trained on here)."""
    path = data / "hh_rlhf" / "harmless_base_pairs_dev.jsonl"
    if n <= 0 or not path.is_file():
        return []
    out = []
    for r in _read_jsonl(path, n):
        msgs = hh_transcript_to_messages(r["chosen"])
        if msgs and msgs[-1].role == "assistant":
            msgs = [m.model_copy(update={"trainable": m.role == "assistant"}) for m in msgs]
            out.append(SFTRow(messages=msgs, source="general"))
    return out


def _shuffled(rows: list[SFTRow], seed: int) -> list[SFTRow]:
    r = list(rows)
    random.Random(seed).shuffle(r)
    return r


def _plot_summary(out: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    xs = [0, 1]
    acc = [100 * before["accuracy"], 100 * after["accuracy"]]
    err = [[100 * (before["accuracy"] - before["ci95"][0]), 100 * (after["accuracy"] - after["ci95"][0])],
           [100 * (before["ci95"][1] - before["accuracy"]), 100 * (after["ci95"][1] - after["accuracy"])]]
    ax.bar(xs, acc, yerr=err, capsize=6, color=["#999999", "#3366cc"])
    ax.set_xticks(xs, ["before", "after"])
    ax.set_ylabel("accuracy (%) with 95% CI")
    ax.set_title(f"GSM8K-PAL, n={before['n']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "before_after.png", dpi=90)
    plt.close(fig)


def _sft_bf16(setting: bool | None) -> bool:
    """bf16 autocast for SFT: as set, or (None) where the CPU does bf16 natively — emulated bf16 on AVX2 is
    slower than fp32 (benchmarks/RESULTS.md, "Decoding on every CPU")."""
    from ragloop.models.cpu import autocast_bf16

    return autocast_bf16() if setting is None else setting
