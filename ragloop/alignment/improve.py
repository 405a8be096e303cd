"""``ragloop improve``: the whole loop — the agents' own traces make the same local model a better agent.

For GSM8K with PAL (Gao et al. 2023):

1. baseline: greedy PAL on a fixed held-out slice of ``test_dev300.jsonl`` (first ``eval_n`` rows);
2. collect: sample several programs per training question with the starting policy (traces);
3. filter + critique: keep correct, well-formed traces with no injection flag; every trace gets programmatic
   critiques (does the program run, does it answer the question asked, is its context clean);
4. SFT on the kept traces plus teacher programs converted mechanically from the calculator annotations of
   ``train.jsonl`` (Cobbe et al. 2021) — in exactly the prompt format the agent runs with;
5. reward model on preference pairs: correct vs incorrect samples of the same question (after SFT), and
   teacher programs vs incorrect samples (trained only when an RL stage will use it);
6. RL from the SFT policy (``rl``): PPO (Schulman et al. 2017) with a programmatic reward (the program's
   answer is right / it ran / no program) plus the reward model's score, KL-leashed to the SFT model; or GRPO
   (Shao et al. 2024; ``grpo.py``) over PAL episodes with reward = correct + ``grpo_w_format``·format valid
   (+ ``rm_weight``·reward model), keep-best on the validation slice; or none;
7. evaluate again on the same slice; write the before/after table (accuracy with Wilson 95% CI, format
   validity, mean steps/tokens, KL to the starting model, forgetting on a held-out general set), the curves
   and every trace, and ``summary.json``.

Validation slice: ``val_n`` questions of ``train.jsonl`` drawn first by the seeded shuffle and held out from
every training stage (collection, SFT's own and teacher rows, reward-model pairs, RL prompts); every choice
between checkpoints or arms is made on it, never on the reported test slice. ``summary.json`` records it.

Ablation (``ablate``; issue 11 §6): from the same start and the same total budget, on the same test slice —
start | SFT only | SFT + GRPO | SFT + PPO | the arm best on validation + verifier@N. Compute-saving design:
one SFT run to a branch point (``sft_share`` of each arm's training minutes), whose weights are kept; the
"SFT only" arm continues SFT on the same rows (reshuffled) for the rest of the arm's minutes, while GRPO and
PPO each start from the branch weights with the same remaining minutes (a reward model trained once from
the branch policy's samples is charged to both), so every arm had the same training minutes
(``improve_budget.py`` gives the split, printed before training). Each arm is evaluated on the test slice
(accuracy, Wilson CI, format validity, KL to the start, general-set NLL) and on the validation slice;
``final_stage`` is the arm with the best validation accuracy (ties: the less trained arm). verifier@N samples
N programs per test question with that arm and lets the reward model — an outcome verifier trained on the
policy's own correct vs incorrect programs — pick one (``ragloop.eval.select``; Cobbe et al. 2021), with
majority@N and pass@N on the same samples.

Budget (issue 11 §1): ``budget_minutes`` on ``budget_clock`` (CPU machine-minutes by default, budget.py) for
the whole loop, evaluations included. The plan is made after the baseline's first batch (the cost of an
episode is measured, not guessed) and refined on the whole baseline and on the collection: evaluations,
validation, collection, the verifier's samples and a reserve are set aside, and the training stages share
the rest (≥ ``min_train_share``, else a ``UsageError`` saying what to change — also when SFT would get
less than ``min_sft_minutes``; the refusal comes after the first batch only — a later re-plan that misses
the minimums says so in a warning and in ``stages.plan_warnings``, and goes on). Each training stage stops at its deadline after a checkpoint; the deadline
is re-cut before each stage to what the clock has left after what remains to be done. ``summary.json``
``budget`` says asked, used, the clock, minutes per stage and the training share.
"""

from __future__ import annotations

import json
import logging
import math
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
from ragloop.alignment.improve_budget import KL_PROBE_FACTOR, KL_PROBE_TRACES, BudgetPlan, StageClock, plan_budget
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
    ppo: bool = True  # False = rl "none" (kept for --no-ppo)
    rl: str = "ppo"  # the RL stage after SFT: "ppo", "grpo" or "none" (ignored by ablate, which runs all)
    ablate: bool = False  # start | SFT only | SFT+GRPO | SFT+PPO from one start and one budget (run_improve)
    val_n: int = 50  # validation questions from train.jsonl, held out from every training stage (keep-best)
    sft_epochs: int | None = None  # None: as many passes over the rows as the SFT budget buys
    grpo_batch_questions: int = 4  # questions (groups) per GRPO iteration
    grpo_samples: int = 4  # episodes per question (the group)
    grpo_lr: float = 1e-4  # LoRA on the SFT policy
    grpo_kl_coef: float = 0.04
    grpo_temperature: float = 1.0
    grpo_w_format: float = 0.2  # reward = correct + w_format·format valid (+ rm_weight·RM when trained)
    grpo_eval_every: int = 5  # GRPO iterations between keep-best validations
    grpo_max_iterations: int = 200
    verifier_samples: int = 8  # ablation: the chosen arm + verifier@N on the test slice (0 = not run)
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
    min_sft_minutes: float = 2.0  # refuse up front (UsageError) when the plan gives SFT less than this
    min_train_share: float = 0.6  # ... or gives the training stages less than this share of the budget
    progress_every_s: float = 15.0  # wall seconds between live progress lines of a training stage
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
        if self.rl not in ("ppo", "grpo", "none"):
            raise UsageError(f"unknown RL stage {self.rl!r}", hint="use --rl ppo, --rl grpo or --rl none")
        if not self.ppo and self.rl == "ppo":
            self.rl = "none"  # --no-ppo
        if self.val_n < 1 or self.grpo_samples < 2:
            raise ConfigError("val_n must be >= 1 and grpo_samples >= 2")
        if not 0 < self.min_train_share < 1:
            raise ConfigError("min_train_share must be in (0, 1)")
        if self.ablate and self.task != "gsm8k-pal":
            raise UsageError("--ablate is for --task gsm8k-pal", hint="drop --ablate, or use --task gsm8k-pal")


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


def kl_to_reference(policy: Any, ref_model: Any, traces: Sequence[Trace], *, max_traces: int = KL_PROBE_TRACES) -> float:
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


def run_improve(cfg: ImproveConfig, *, policy: Any = None, progress: Callable[[str], None] | None = None,
                hooks: dict[str, Callable[..., Any]] | None = None) -> dict[str, Any]:
    """Run the loop; returns the summary (also written to ``<out>/summary.json``). ``policy`` may be passed
    in (tests use the tiny model); otherwise ``cfg.policy`` is loaded. ``task="scifact-react"`` runs
    ``ragloop.alignment.improve_react`` with this config's shared settings. ``hooks`` (tests):
    ``"validation"(arm, scores) -> scores`` sees (and may replace) each arm's validation scores."""
    if cfg.task == "scifact-react":
        from ragloop.alignment.improve_react import ReactImproveConfig, run_improve_react

        rcfg = ReactImproveConfig(out_dir=cfg.out_dir, policy=cfg.policy, index=cfg.index,
                                  budget_minutes=cfg.budget_minutes, budget_clock=cfg.budget_clock, seed=cfg.seed,
                                  data_dir=cfg.data_dir, eval_n=cfg.eval_n, sft_method=cfg.sft_method)
        return run_improve_react(rcfg, policy=policy, progress=progress)
    return _Loop(cfg, policy=policy, progress=progress, hooks=hooks or {}).run()


ARMS = ("start", "sft", "sft+grpo", "sft+ppo")  # the ablation's arms, in the order ties are broken


class _Loop:
    """The GSM8K-PAL loop's state: data split, policy, budget clock and stage accounting (one run)."""

    def __init__(self, cfg: ImproveConfig, *, policy: Any, progress: Callable[[str], None] | None,
                 hooks: dict[str, Callable[..., Any]]) -> None:
        import copy

        from ragloop.agents.sandbox import Sandbox

        self.cfg, self.hooks = cfg, hooks
        self.now = make_clock(cfg.budget_clock)
        self.sc = StageClock(self.now)
        self.clock = _Clock(cfg.budget_minutes * 60.0, self.now, self.sc.t0)
        self.wall0 = time.perf_counter()
        self.say = progress or (lambda msg: log.info(msg))
        self.out = Path(cfg.out_dir)
        (self.out / "traces").mkdir(parents=True, exist_ok=True)
        self.data = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        self.eval_rows = _read_jsonl(self.data / "gsm8k" / "test_dev300.jsonl", cfg.eval_n)
        self.train_rows = _read_jsonl(self.data / "gsm8k" / "train.jsonl")
        if policy is None:
            from ragloop.models.loading import load_policy

            policy = load_policy(cfg.policy)
        self.policy = policy
        self.start_name = policy.name
        self.ref_model = copy.deepcopy(policy.model).eval()  # the start: KL and forgetting are measured against it
        self.make = pal_factory(cfg)
        self.sandbox = Sandbox()
        self.stages: dict[str, Any] = {}
        order = list(range(len(self.train_rows)))
        random.Random(cfg.seed).shuffle(order)  # a seeded shuffle; disjoint subsets per stage
        # validation first: these questions are never collected, trained on, or used as RL prompts
        self.val_idx = order[: cfg.val_n]
        rest = order[cfg.val_n :]
        self.collect_idx = rest[: cfg.collect_questions]
        self.rm_idx = rest[cfg.collect_questions : cfg.collect_questions + cfg.rm_questions]
        self.teacher_idx = rest[cfg.collect_questions + cfg.rm_questions :]
        if cfg.teacher_limit is not None:
            self.teacher_idx = self.teacher_idx[: cfg.teacher_limit]
        self.val_rows = [self.train_rows[i] for i in self.val_idx]
        self.rm_on = cfg.rm and (cfg.ablate or cfg.rl != "none")
        self.plan: BudgetPlan | None = None
        self.general = _general_rows(self.data, cfg.general_n)
        self.gex: list[Any] = []
        self.general_nll_start = float("nan")
        self.kl_s: float | None = None  # measured cost of one KL + forgetting probe

    # ------------------------------------------------------------------------------------ pieces

    def episodes(self, rows: Sequence[dict[str, Any]]) -> list[Trace]:
        """Greedy PAL episodes on ``rows`` (the agent's own decoding, batched), scored against the gold answers."""
        traces = [ts[0] for ts in run_agent_batched(self.make, self.policy, [r["question"] for r in rows],
                                                    sandbox=self.sandbox, batch_size=self.cfg.eval_batch, task="gsm8k")]
        for t, r in zip(traces, rows, strict=True):
            score_gsm8k(t, gsm8k_gold(r["answer"]))
        return traces

    def summarize_eval(self, traces: list[Trace], tag: str, seconds: float, kind: str = "eval") -> dict[str, Any]:
        write_traces(self.out / "traces" / f"{kind}-{tag}.jsonl", traces)
        s = summarize(traces, seconds=seconds).to_dict()
        s["policy"] = self.policy.name
        s["budget_seconds"] = round(seconds, 1)
        what = "validation" if kind == "val" else "eval"
        self.say(f"{what} ({tag}): {s['correct']}/{s['n']} correct ({100 * s['accuracy']:.1f}%), "
                 f"format valid {100 * s['format_valid']:.1f}%, {seconds:.0f} s · {self.clock.left() / 60:.1f} min left")
        return s

    def evaluate(self, tag: str, stage: str) -> tuple[dict[str, Any], list[Trace]]:
        with self.sc.stage(stage):
            c0 = self.now()
            traces = self.episodes(self.eval_rows)
            return self.summarize_eval(traces, tag, self.now() - c0), traces

    def validate(self, arm: str) -> dict[str, Any]:
        """The arm's greedy accuracy on the validation slice (train.jsonl rows held out from training)."""
        with self.sc.stage("validation"):
            c0 = self.now()
            traces = self.episodes(self.val_rows)
            s = self.summarize_eval(traces, arm.replace("+", "-"), self.now() - c0, kind="val")
        if "validation" in self.hooks:
            s = self.hooks["validation"](arm, s)
        return s

    def sample(self, idx: Sequence[int], tag: str) -> list[Trace]:
        cfg = self.cfg
        qs = [self.train_rows[i]["question"] for i in idx]
        if not qs:
            return []
        dec = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.collect_temperature, top_p=0.95,
                               seed=cfg.seed + len(tag))
        groups = run_agent_batched(self.make, self.policy, qs, samples=cfg.collect_samples, decoding=dec,
                                   sandbox=self.sandbox, batch_size=max(1, cfg.eval_batch // cfg.collect_samples),
                                   task="gsm8k")
        traces = []
        for i, ts in zip(idx, groups, strict=True):
            for t in ts:
                traces.append(critique_trace(score_gsm8k(t, gsm8k_gold(self.train_rows[i]["answer"]))))
        write_traces(self.out / "traces" / f"collect-{tag}.jsonl", traces)
        k = sum(1 for t in traces if t.feedback.correct)
        self.say(f"collect ({tag}): {len(traces)} traces, {k} correct")
        return traces

    def make_plan(self, row_s: float, sample_row_s: float | None = None, *, strict: bool = True) -> BudgetPlan:
        """The budget plan at these measured episode costs; only the first (after the probe) may refuse."""
        cfg = self.cfg
        return plan_budget(
            budget_s=cfg.budget_minutes * 60.0, clock=cfg.budget_clock, row_s=row_s, sample_row_s=sample_row_s,
            eval_n=len(self.eval_rows),
            val_n=len(self.val_rows), collect_episodes=len(self.collect_idx) * cfg.collect_samples,
            rm_collect_episodes=len(self.rm_idx) * cfg.collect_samples, rm=cfg.rm,
            verifier_episodes=cfg.verifier_samples * len(self.eval_rows) if cfg.ablate and cfg.rm else 0, rl=cfg.rl, ablate=cfg.ablate,
            sft_share=cfg.sft_share, rm_share=cfg.rm_share, rl_share=cfg.ppo_share, reserve_s=cfg.reserve_seconds,
            min_train_share=cfg.min_train_share, min_sft_s=cfg.min_sft_minutes * 60.0, strict=strict)

    def replan(self, what: str, row_s: float, sample_row_s: float | None = None) -> None:
        self.plan = self.make_plan(row_s, sample_row_s, strict=False)
        self.say(f"re-planned on {what}: " + self.plan.describe())
        if self.plan.warning:
            self.say(f"warning: the measured costs are higher than the probe's: {self.plan.warning}")
            self.stages.setdefault("plan_warnings", []).append(self.plan.warning)

    def reserved(self, *, tests: int, vals: int, kls: int = 0, rm_collect: bool = False, train: float = 0.0) -> float:
        """Seconds to keep free for what comes after the current stage: the plan's estimates, and ``kls`` KL and
        forgetting probes at their measured cost."""
        assert self.plan is not None
        greedy = tests * len(self.eval_rows) + vals * len(self.val_rows)
        sampled = self.plan.verifier_episodes + (len(self.rm_idx) * self.cfg.collect_samples if rm_collect else 0)
        kl = kls * (self.kl_s if self.kl_s is not None else
                    KL_PROBE_FACTOR * min(len(self.eval_rows), KL_PROBE_TRACES) * self.plan.row_s)
        return greedy * self.plan.row_s + sampled * self.plan.sample_row_s + kl + self.cfg.reserve_seconds + train

    def allot(self, planned: float, **after: Any) -> float:
        """A training stage's seconds: its plan, cut to what the clock has left after ``reserved(**after)``."""
        return max(self.cfg.min_stage_seconds, min(planned, self.clock.left() - self.reserved(**after)))

    def stage_progress(self, stage: str, keys: Sequence[str]) -> Callable[[dict[str, Any]], None]:
        """A live line per training stage: stage, step, loss/reward, minutes left (at most every few seconds)."""
        last = [-math.inf]

        def cb(row: dict[str, Any]) -> None:
            t = time.monotonic()
            if t - last[0] < self.cfg.progress_every_s:
                return
            last[0] = t
            shown = [f"{k.split('/')[-1]} {row[k]:.4g}" for k in keys if isinstance(row.get(k), int | float)]
            self.say(f"[{stage}] step {row.get('step', '?')}" + (f", {', '.join(shown)}" if shown else "")
                     + f" · {self.clock.left() / 60:.1f} min left")

        return cb

    def arm_metrics(self, traces: list[Trace]) -> dict[str, float]:
        """KL to the start along the arm's own test completions, and the general-set NLL (forgetting)."""
        from ragloop.alignment.sft import mean_nll

        c0 = self.now()
        with self.sc.stage("kl_forgetting"):
            out = {"kl_to_start": kl_to_reference(self.policy, self.ref_model, traces)}
            if self.gex:
                out["general_nll"] = mean_nll(self.policy.model, self.gex, self.policy.pad_id)
        self.kl_s = self.now() - c0  # what the next arms' probes are reserved at
        return out

    def sft_rows(self, collected: list[Trace]) -> tuple[list[SFTRow], int]:
        kept = filter_traces(collected, report=(filt := DropReport()))
        self.stages["filter"] = filt.to_dict()
        self_rows, _ = traces_to_sft_rows(kept)
        rows = [r.model_copy(update={"source": "self"}) for r in self_rows]
        if self.cfg.teacher:
            t_rows = [self.train_rows[i] for i in self.teacher_idx]
            prompts = agent_prompts(self.make, self.policy, [r["question"] for r in t_rows])
            teach, trep = teacher_traces(t_rows, prompts, policy_name=self.start_name)
            self.stages["teacher"] = trep.to_dict()
            write_traces(self.out / "traces" / "teacher.jsonl", teach)
            t_sft, _ = traces_to_sft_rows(teach)
            rows += [r.model_copy(update={"source": "teacher"}) for r in t_sft]
        return rows, len(self_rows)

    def sft(self, rows: list[SFTRow], *, budget_s: float, out_dir: str, name: str, seed: int, stage: str) -> Any:
        from ragloop.alignment.sft import SFTConfig, run_sft

        cfg = self.cfg
        sft_cfg = SFTConfig(out_dir=out_dir, method=cfg.sft_method, lr=cfg.sft_lr, batch_size=cfg.sft_batch,
                            max_length=cfg.sft_max_length, bf16=_sft_bf16(cfg.sft_bf16), seed=seed,
                            budget_seconds=max(1.0, budget_s), save_every=100, warmup_steps=5, name=name,
                            epochs=cfg.sft_epochs or 1000, budget_clock=cfg.budget_clock)
        self.say(f"[{stage}] SFT on {len(rows)} rows, budget {budget_s / 60:.1f} min")
        res = run_sft(sft_cfg, self.policy, _shuffled(rows, seed), general_rows=self.general,
                      progress=self.stage_progress(stage, ("loss",)))
        self.policy.name = name
        self.stages[stage] = {"steps": res.steps, "final_loss": res.final_loss, "stopped_by": res.stopped_by,
                              "tokens_per_s": res.tokens_per_second, "rows": len(rows), "policy": str(res.policy_dir),
                              "budget_s": round(budget_s, 1), "data": res.data_report}
        return res

    def reward_model(self, collected: list[Trace]) -> Any:
        """Preference pairs from samples of the current (SFT) policy; the trained reward model, or None."""
        from ragloop.alignment.reward import RewardConfig, load_reward_model, train_reward_model

        assert self.plan is not None
        cfg = self.cfg
        with self.sc.stage("collect_rm"):
            rm_traces = self.sample(self.rm_idx, "sft")
        with self.sc.stage("rm"):
            pairs = outcome_pairs(rm_traces + collected)
            gold_programs = {self.train_rows[i]["question"]: self.train_rows[i]["answer"]
                             for i in self.rm_idx + self.collect_idx}
            for t in rm_traces + collected:  # the teacher's program over the model's wrong program
                prog = gsm8k_answer_to_program(t.question, gold_programs[t.question], comments=False)
                if prog is not None and not t.feedback.correct and trace_response_text(t):
                    pairs.append(PreferencePair(prompt=trace_prompt_text(t), chosen=teacher_continuation(prog),
                                                rejected=trace_response_text(t)))
            self.stages["rm_pairs"] = len(pairs)
            if len(pairs) < 4:
                self.say(f"reward model: only {len(pairs)} preference pairs, not trained")
                return None
            budget = max(cfg.min_stage_seconds, self.plan.rm_s)
            rm_res = train_reward_model(RewardConfig(out_dir=str(self.out / "rm"), freeze_backbone=cfg.rm_freeze_backbone,
                                                     epochs=20 if cfg.rm_freeze_backbone else 1, seed=cfg.seed,
                                                     budget_seconds=budget, test_fraction=0.2,
                                                     budget_clock=cfg.budget_clock), pairs,
                                        progress=self.stage_progress("rm", ("loss", "accuracy")))
            self.stages["rm"] = rm_res.to_dict()
            self.say(f"reward model: {len(pairs)} pairs, held-out accuracy {rm_res.test_accuracy:.3f}")
            return load_reward_model(rm_res.model_dir)

    def rl_items(self) -> list[dict[str, Any]]:
        return [self.train_rows[i] for i in self.rm_idx + self.collect_idx]  # both RL stages: the same questions

    def ppo(self, rm_model: Any, budget_s: float, fallback: Any) -> tuple[Path | None, bool]:
        """PPO from the current policy; returns (policy dir, True) or, if it failed, restores ``fallback``."""
        from ragloop.alignment.ppo import PPOConfig, PPOItem, make_reward_fn, run_ppo

        cfg = self.cfg
        rows = self.rl_items()
        prompts = agent_prompts(self.make, self.policy, [r["question"] for r in rows])
        items = [PPOItem(prompt=p, meta={"question": r["question"], "gold": gsm8k_gold(r["answer"])})
                 for p, r in zip(prompts, rows, strict=True)]
        check = pal_reward_check(self.make, self.policy, self.sandbox)
        reward_fn = make_reward_fn(check=check, reward_model=rm_model, rm_weight=cfg.rm_weight if rm_model else 0.0,
                                   rm_prompt=lambda it: it.meta["question"], rm_clip=3.0)
        stops = self.make(self.policy, self.sandbox)._decoding().stop  # the agent's own stop strings
        self.say(f"[ppo] PPO from the SFT policy, budget {budget_s / 60:.1f} min")
        base = self.policy.name
        ppo_cfg = PPOConfig(out_dir=str(self.out / "ppo"), iterations=cfg.ppo_max_iterations,
                            batch_prompts=cfg.ppo_batch_prompts, samples_per_prompt=cfg.ppo_samples,
                            max_new_tokens=cfg.max_new_tokens, stop=stops, lr=cfg.ppo_lr, kl_coef=cfg.ppo_kl_coef,
                            seed=cfg.seed, budget_seconds=max(1.0, budget_s), name=f"{self.start_name}-ppo",
                            minibatch_size=4, budget_clock=cfg.budget_clock)
        try:
            res = run_ppo(ppo_cfg, self.policy, items, reward_fn,
                          progress=self.stage_progress("ppo", ("env/reward_mean", "objective/kl")))
        except TrainingError as e:  # PPO diverged beyond its rollbacks: keep the SFT policy and say so
            self.say(f"PPO stopped: {e.message}; the SFT policy stands in for it")
            self.stages["ppo"] = {"failed": e.message}
            self.policy.model, self.policy.name = fallback, base
            return None, False
        self.policy.name = f"{self.start_name}-ppo"
        last = res.history[-1] if res.history else {}
        self.stages["ppo"] = {"iterations": res.iterations, "rollbacks": res.rollbacks, "stopped_by": res.stopped_by,
                              "reward_first": res.history[0].get("env/reward_mean") if res.history else None,
                              "reward_last": last.get("env/reward_mean"), "kl_last": last.get("objective/kl"),
                              "budget_s": round(budget_s, 1), "policy": str(res.policy_dir)}
        return res.policy_dir, True

    def grpo(self, rm_model: Any, budget_s: float, fallback: Any) -> tuple[Path | None, bool]:
        """GRPO from the current policy with keep-best on the validation slice; returns (policy dir, whether
        a GRPO iteration's weights won keep-best) or, if it failed, restores ``fallback``."""
        from ragloop.alignment.grpo import GRPOConfig, GRPOItem, make_episode_reward, run_grpo

        assert self.plan is not None
        cfg = self.cfg
        items = [GRPOItem(question=r["question"], gold=gsm8k_gold(r["answer"])) for r in self.rl_items()]
        val_items = [GRPOItem(question=r["question"], gold=gsm8k_gold(r["answer"])) for r in self.val_rows]
        reward_fn = make_episode_reward(task="gsm8k", w_correct=1.0, w_format=cfg.grpo_w_format,
                                        reward_model=rm_model, w_rm=cfg.rm_weight if rm_model else 0.0, rm_clip=3.0)
        # run_grpo checks its budget after an iteration and then validates: keep one of each in hand
        over = 2 * cfg.grpo_batch_questions * cfg.grpo_samples * self.plan.sample_row_s + len(val_items) * self.plan.row_s
        inner = max(cfg.min_stage_seconds, budget_s - over)
        self.say(f"[grpo] GRPO from the SFT policy, budget {budget_s / 60:.1f} min "
                 f"(keep-best on {len(val_items)} validation questions)")
        base = self.policy.name
        gcfg = GRPOConfig(out_dir=str(self.out / "grpo"), iterations=cfg.grpo_max_iterations,
                          batch_questions=cfg.grpo_batch_questions, samples=cfg.grpo_samples, task="gsm8k",
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.grpo_temperature, lr=cfg.grpo_lr,
                          kl_coef=cfg.grpo_kl_coef, eval_every=cfg.grpo_eval_every, seed=cfg.seed,
                          budget_seconds=inner, budget_clock=cfg.budget_clock, name=f"{self.start_name}-grpo")
        try:
            res = run_grpo(gcfg, self.policy, items, self.make, reward_fn, val_items=val_items, sandbox=self.sandbox,
                           progress=self.stage_progress("grpo", ("grpo/reward_mean", "grpo/zero_std_frac", "grpo/kl")))
        except TrainingError as e:
            self.say(f"GRPO stopped: {e.message}; the SFT policy stands in for it")
            self.stages["grpo"] = {"failed": e.message}
            self.policy.model, self.policy.name = fallback, base
            return None, False
        self.policy.name = f"{self.start_name}-grpo"
        self.stages["grpo"] = {"iterations": res.iterations, "stopped_by": res.stopped_by, "alarm": res.alarm,
                               "best_iteration": res.best_iteration, "best_score": res.best_score,
                               "validation": res.validation, "budget_s": round(budget_s, 1),
                               "reward_first": res.history[0].get("grpo/reward_mean") if res.history else None,
                               "reward_last": res.history[-1].get("grpo/reward_mean") if res.history else None,
                               "policy": str(res.policy_dir)}
        if res.alarm:
            self.say(f"GRPO alarm: {res.alarm}")
        return res.policy_dir, res.best_iteration != 0

    def verifier_arm(self, final: str, arm: dict[str, Any], rm_model: Any) -> dict[str, Any]:
        """The chosen arm + verifier@N on the test slice: N sampled runs per question, the reward model (an
        outcome verifier: trained on the SFT policy's correct vs incorrect programs) picks one
        (``ragloop.eval.select``); majority@N, majority+verifier@N and pass@N on the same samples."""
        from ragloop.alignment.data import format_valid
        from ragloop.eval.select import compare_methods
        from ragloop.eval.stats import wilson_ci

        cfg = self.cfg
        if cfg.verifier_samples < 1:
            return {"not_run": "verifier_samples is 0 (--verifier-samples)"}
        if rm_model is None:
            return {"not_run": "no reward model was trained (too few preference pairs, or --no-rm): nothing to verify with"}
        assert self.plan is not None
        need = self.plan.verifier_episodes * self.plan.sample_row_s
        if self.clock.left() < need:  # the budget bounds the whole loop: a row that does not fit is not run
            return {"not_run": f"the budget had {max(0.0, self.clock.left()) / 60:.1f} min left and "
                               f"verifier@{cfg.verifier_samples} needs ~{need / 60:.1f} min: raise --budget-minutes or "
                               "lower --verifier-samples"}
        with self.sc.stage("verifier"):
            if final == "start":
                self.policy.model = self.ref_model
            else:
                from ragloop.models.loading import load_policy

                self.policy.model = load_policy(arm["policy"]).model
            dec = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.collect_temperature, top_p=0.95,
                                   seed=cfg.seed + 7)
            groups = run_agent_batched(self.make, self.policy, [r["question"] for r in self.eval_rows],
                                       samples=cfg.verifier_samples, decoding=dec, sandbox=self.sandbox,
                                       batch_size=max(1, cfg.eval_batch // cfg.verifier_samples), task="gsm8k")
            picks: dict[str, list[Trace]] = {}
            any_ok = 0
            for ts, r in zip(groups, self.eval_rows, strict=True):
                for t in ts:
                    score_gsm8k(t, gsm8k_gold(r["answer"]))
                scores = rm_model.score_batch([trace_prompt_text(t) or t.question for t in ts],
                                              [trace_response_text(t) for t in ts])
                for m, sel in compare_methods([t.answer for t in ts], task="gsm8k", scores=scores,
                                              verifier_name="reward-model").items():
                    picks.setdefault(m, []).append(ts[sel.index])
                any_ok += any(t.feedback.correct for t in ts)
            write_traces(self.out / "traces" / "verifier-samples.jsonl", [t for ts in groups for t in ts])
        n = len(self.eval_rows)
        acc = {m: sum(1 for t in picks[m] if t.feedback.correct) for m in picks}
        k = acc["verifier"]
        out = {"accuracy": k / n, "ci95": list(wilson_ci(k, n)), "n": n, "correct": k,
               "format_valid": sum(1 for t in picks["verifier"] if format_valid(t)) / n,
               "kl_to_start": arm.get("kl_to_start"), "general_nll": arm.get("general_nll"), "minutes": arm["minutes"],
               "inference_minutes": round(self.sc.seconds["verifier"] / 60, 3), "samples": cfg.verifier_samples,
               "majority_accuracy": acc["majority"] / n, "majority_verifier_accuracy": acc["majority+verifier"] / n,
               "pass_at_n": any_ok / n, "greedy_accuracy": arm["accuracy"], "policy": arm.get("policy"),
               "val_accuracy": None, "val_n": None}
        self.say(f"verifier@{cfg.verifier_samples} ({final}): {k}/{n} ({100 * k / n:.1f}%); majority "
                 f"{100 * acc['majority'] / n:.1f}%, pass@{cfg.verifier_samples} {100 * any_ok / n:.1f}%")
        return out

    # --------------------------------------------------------------------------------------- run

    def baseline(self) -> tuple[dict[str, Any], list[Trace]]:
        """The baseline evaluation, with the budget planned after its first batch (the probe): a budget that
        cannot train is refused before the rest is spent."""
        cfg = self.cfg
        with self.sc.stage("baseline_eval"):
            c0 = self.now()
            k = min(cfg.eval_batch, len(self.eval_rows))
            traces = self.episodes(self.eval_rows[:k])
            self.plan = self.make_plan((self.now() - c0) / k)
            self.say(self.plan.describe())
            traces += self.episodes(self.eval_rows[k:])
            s = self.summarize_eval(traces, "before", self.now() - c0)
        self.replan("the whole baseline", s["budget_seconds"] / len(self.eval_rows))
        return s, traces

    def run(self) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        before, _ = self.baseline()
        if self.general:
            from ragloop.alignment.masking import tokenize_rows
            from ragloop.alignment.sft import mean_nll

            self.gex, _ = tokenize_rows(self.general, self.policy.render, self.policy.tokenizer,
                                        max_length=cfg.sft_max_length)
            self.general_nll_start = mean_nll(self.ref_model, self.gex, self.policy.pad_id)
        with self.sc.stage("collect"):
            c0 = self.now()
            collected = self.sample(self.collect_idx, "start")
        if collected:  # sampled episodes cost more than greedy ones (sandbox runs of programs that parse)
            assert self.plan is not None
            self.replan("the collection's cost", self.plan.row_s, (self.now() - c0) / len(collected))
        result = self.run_ablation(before, collected) if cfg.ablate else self.run_single(before, collected)
        del self.ref_model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        summary = {
            "task": cfg.task, "slice": f"gsm8k/test_dev300.jsonl rows 0-{len(self.eval_rows) - 1}",
            "validation": {"file": "gsm8k/train.jsonl", "rows": self.val_idx, "n": len(self.val_idx),
                           "seed": cfg.seed, "held_out_from": "collection, SFT (own and teacher rows), reward "
                                                              "model pairs and RL prompts"},
            "before": before, **result,
            "start_policy": self.start_name, "budget_minutes": cfg.budget_minutes, "budget_clock": cfg.budget_clock,
            "plan": self.plan.to_dict() if self.plan else None,
            "stages": self.stages, "config": asdict(cfg),
        }
        summary["budget"] = self.sc.report(asked_s=cfg.budget_minutes * 60.0, clock=cfg.budget_clock)
        summary["elapsed_minutes"] = summary["budget"]["used"]
        summary["wall_minutes"] = round((time.perf_counter() - self.wall0) / 60, 2)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
        (self.out / "table.md").write_text(summary["table"] + "\n", encoding="utf-8")
        _plot_summary(self.out, before, summary["after"])
        b = summary["budget"]
        self.say(f"budget: used {b['used']:.2f} of {b['asked']:g} min ({b['clock']} clock), "
                 f"{100 * b['training_share']:.0f}% in training stages")
        return summary

    def run_single(self, before: dict[str, Any], collected: list[Trace]) -> dict[str, Any]:
        """baseline → collect → SFT → [reward model → PPO | GRPO] → eval."""
        assert self.plan is not None
        cfg, plan = self.cfg, self.plan
        with self.sc.stage("sft"):
            c0 = self.now()
            rows, n_self = self.sft_rows(collected)
            budget = self.allot(plan.sft_s - (self.now() - c0), tests=1, vals=0, kls=1, rm_collect=self.rm_on,
                                train=plan.rm_s + plan.rl_s)
            sft_res = self.sft(rows, budget_s=budget, out_dir=str(self.out / "sft"), name=f"{self.start_name}-sft",
                               seed=cfg.seed, stage="sft")
            self.stages["sft"]["own_rows"] = n_self
        final_dir, final_stage = sft_res.policy_dir, "sft"
        if cfg.rl != "none":
            import copy

            rm_model = self.reward_model(collected) if self.rm_on else None
            fallback = copy.deepcopy(self.policy.model)
            with self.sc.stage(cfg.rl):
                budget = max(cfg.min_stage_seconds, self.clock.left() - self.reserved(tests=1, vals=0, kls=1))
                d, won = (self.ppo if cfg.rl == "ppo" else self.grpo)(rm_model, budget, fallback)
            del fallback
            if d is not None:
                final_dir = d
                final_stage = f"sft+{cfg.rl}" if won else "sft"  # GRPO's keep-best may keep the SFT weights
        after, after_traces = self.evaluate("after", "eval_after")
        extra = self.arm_metrics(after_traces)
        extra_t = {"kl_to_start": extra["kl_to_start"], "general_nll_before": self.general_nll_start,
                   "general_nll_after": extra.get("general_nll", float("nan"))}
        return {"after": after, **extra_t, "policy": str(final_dir) if final_dir else None,
                "final_stage": final_stage, "table": _table(before, after, extra_t)}

    def run_ablation(self, before: dict[str, Any], collected: list[Trace]) -> dict[str, Any]:
        """start | SFT only | SFT+GRPO | SFT+PPO from one SFT branch point, each arm the same training
        minutes (improve_budget.py), all evaluated on the same test slice; the final arm is chosen on the
        validation slice."""
        import copy

        assert self.plan is not None
        cfg, plan = self.cfg, self.plan
        arms: dict[str, dict[str, Any]] = {}
        val: dict[str, dict[str, Any]] = {"start": self.validate("start")}
        arms["start"] = {**before, "kl_to_start": 0.0, "general_nll": self.general_nll_start, "minutes": 0.0,
                         "policy": None}
        # SFT to the branch point (shared by every arm)
        with self.sc.stage("sft_branch"):
            c0 = self.now()
            rows, n_self = self.sft_rows(collected)
            budget = self.allot(plan.sft_s - (self.now() - c0), tests=3, vals=3, kls=3, rm_collect=self.rm_on,
                                train=plan.sft_continue_s + plan.rm_s + 2 * plan.rl_s)
            branch_res = self.sft(rows, budget_s=budget, out_dir=str(self.out / "sft_branch"),
                                  name=f"{self.start_name}-sft-branch", seed=cfg.seed, stage="sft_branch")
            self.stages["sft_branch"]["own_rows"] = n_self
            branch = copy.deepcopy(self.policy.model)
        branch_name = self.policy.name
        sec = self.sc.seconds

        def finish(arm: str, tag: str, policy_dir: Path | None, train_stages: Sequence[str]) -> None:
            s, traces = self.evaluate(tag, "eval_" + tag.replace("-", "_"))
            arms[arm] = {**s, **self.arm_metrics(traces), "policy": str(policy_dir) if policy_dir else None,
                         "minutes": round(sum(sec.get(k, 0.0) for k in train_stages) / 60, 3)}
            val[arm] = self.validate(arm)

        # every arm's minutes after the branch point, re-cut to what the clock has left so that the three stay
        # equal when the estimates were off: SFT continuation = reward model + GRPO = reward model + PPO
        avail = self.clock.left() - self.reserved(tests=3, vals=3, kls=3, rm_collect=self.rm_on)
        rest = max(cfg.min_stage_seconds, min(plan.sft_continue_s, (avail + (plan.rm_s if self.rm_on else 0.0)) / 3))
        self.stages["arm_rest_s"] = round(rest, 1)
        # arm "sft": the same SFT continued on the same rows (reshuffled) for the rest of the arm's minutes
        with self.sc.stage("sft_continue"):
            budget = rest
            res = self.sft(rows, budget_s=budget, out_dir=str(self.out / "sft"), name=f"{self.start_name}-sft",
                           seed=cfg.seed + 1, stage="sft_continue")
        finish("sft", "sft", res.policy_dir, ("sft_branch", "sft_continue"))
        # the RL arms start from the branch point: reward model once (charged to both), then GRPO, then PPO
        self.policy.model, self.policy.name = copy.deepcopy(branch), branch_name
        rm_model = self.reward_model(collected) if self.rm_on else None
        with self.sc.stage("grpo"):
            budget = self.allot(rest - sec.get("rm", 0.0), tests=2, vals=2, kls=2,
                                train=max(0.0, rest - sec.get("rm", 0.0)))
            d, _ = self.grpo(rm_model, budget, copy.deepcopy(branch))
        finish("sft+grpo", "sft-grpo", d or branch_res.policy_dir, ("sft_branch", "rm", "grpo"))
        self.policy.model, self.policy.name = branch, branch_name
        with self.sc.stage("ppo"):
            budget = self.allot(rest - sec.get("rm", 0.0), tests=1, vals=1, kls=1)
            d, _ = self.ppo(rm_model, budget, copy.deepcopy(branch))
        finish("sft+ppo", "sft-ppo", d or branch_res.policy_dir, ("sft_branch", "rm", "ppo"))
        # the final arm: best validation accuracy (ties: the earlier, less trained arm) — never the test slice
        for arm in ARMS:
            arms[arm]["val_accuracy"] = val[arm]["accuracy"]
            arms[arm]["val_n"] = val[arm]["n"]
        final = max(ARMS, key=lambda a: (val[a]["accuracy"], -ARMS.index(a)))
        self.say(f"final stage (chosen on validation): {final}")
        vname = f"{final} + verifier@{cfg.verifier_samples}"
        arms[vname] = self.verifier_arm(final, arms[final], rm_model)
        table = _ablation_table(arms, final)
        keys = ("accuracy", "ci95", "n", "correct", "format_valid", "kl_to_start", "general_nll", "minutes",
                "val_accuracy", "val_n", "policy")
        ablation = {a: {k: arms[a].get(k) for k in keys} for a in ARMS}
        ablation[vname] = arms[vname]
        return {"after": {k: v for k, v in arms[final].items() if k not in ("kl_to_start", "general_nll")},
                "kl_to_start": arms[final]["kl_to_start"], "general_nll_before": self.general_nll_start,
                "general_nll_after": arms[final].get("general_nll"),
                "policy": arms[final]["policy"] if final != "start" else (self.cfg.policy or "default"),
                "final_stage": final, "ablation": ablation, "arm_split": {
                    "branch_minutes": round(sec.get("sft_branch", 0.0) / 60, 3),
                    "planned_arm_minutes": round(plan.arm_s / 60, 3)}, "table": table}




def _f4(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _ablation_table(arms: dict[str, dict[str, Any]], final: str) -> str:
    """One row per arm: test accuracy with its Wilson CI, format validity, KL to start, forgetting, minutes."""
    head = ("| arm | accuracy | 95% CI (Wilson) | correct / n | format valid | KL to start | general NLL | "
            "training min | validation acc |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for arm, a in arms.items():
        mark = " (final)" if arm == final else ""
        if "not_run" in a:
            lines.append(f"| {arm} | not run: {a['not_run']} |" + " |" * 7)
            continue
        lines.append(f"| {arm}{mark} | {100 * a['accuracy']:.1f}% | [{100 * a['ci95'][0]:.1f}, {100 * a['ci95'][1]:.1f}] | "
                     f"{a['correct']} / {a['n']} | {100 * a['format_valid']:.1f}% | {_f4(a.get('kl_to_start'))} | "
                     f"{_f4(a.get('general_nll'))} | {a['minutes']:.2f} | "
                     + (f"{100 * a['val_accuracy']:.1f}% (n={a['val_n']}) |" if a.get("val_accuracy") is not None
                        else f"— (majority@{a['samples']} {100 * a['majority_accuracy']:.1f}%, pass@{a['samples']} "
                             f"{100 * a['pass_at_n']:.1f}%) |"))
    return "\n".join(lines)


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
