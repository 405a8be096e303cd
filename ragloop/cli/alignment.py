"""``ragloop train sft|reward|verifier|ppo|grpo``, ``ragloop cai revise``, ``ragloop rlaif label``, ``ragloop improve``.

Thin commands: parse the options, build the config, call one library function from ``ragloop.alignment``,
print a one-line result. Training commands take ``--resume`` (continue exactly from the last checkpoint in
``--out``; not ``train grpo`` yet). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ragloop.core.errors import DataError, UsageError

train_app = typer.Typer(help="Train the policy (SFT, PPO, GRPO), a reward model or an outcome verifier.", no_args_is_help=True)
cai_app = typer.Typer(help="Constitutional AI: critique → revision over traces.", no_args_is_help=True)
rlaif_app = typer.Typer(help="RLAIF: AI preference labels between two responses.", no_args_is_help=True)

POLICY_HELP = ("Policy: 'default' (embedded SmolLM2), an HF directory, a .gguf file, a ragloop checkpoint, or a "
               "training run's --out directory (its policy/).")


def _echo_row(every: int = 10):
    def show(row: dict[str, Any]) -> None:
        step = row.get("step", 0)
        if step == 1 or step % every == 0:
            parts = [f"{k}={v:.4g}" for k, v in row.items() if k not in ("step", "time") and isinstance(v, float)][:6]
            typer.echo(f"step {step}: " + " ".join(parts), err=True)

    return show


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what} not found: {path}")
    return path


def _out_dir(path: Path) -> Path:
    """``--out`` of a run: a new or existing directory (checked before any model loads)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory",
                         hint="give a new directory (or an existing run's directory) for the run's files")
    return path


def _out_file(path: Path) -> Path:
    """``--out`` of a JSONL result: a file path, not a directory."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory", hint=f"give a file name, e.g. {path / 'out.jsonl'}")
    if path.parent != Path() and path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"--out {path}: {path.parent} is not a directory", hint="give a path in a directory")
    return path


def _budget(minutes: float | None) -> float | None:
    if minutes is None:
        return None
    if minutes <= 0:
        raise UsageError(f"--budget-minutes must be > 0, got {minutes}")
    return minutes * 60.0


# ----------------------------------------------------------------------------------------------- train


@train_app.command("sft")
def train_sft(
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, metrics, curves, policy/)."),
    traces: Path | None = typer.Option(None, "--traces", help="Agent traces (JSONL) to learn from."),
    data: Path | None = typer.Option(None, "--data", help="SFT rows (JSONL with a 'messages' list)."),
    policy: str | None = typer.Option(None, "--policy", help=POLICY_HELP),
    lora: bool = typer.Option(False, "--lora", help="LoRA adapters (merged into the exported policy)."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning."),
    prompt_tuning: bool = typer.Option(False, "--prompt-tuning", help="Soft-prompt tuning (peft)."),
    all_traces: bool = typer.Option(False, "--all-traces", help="Keep incorrect/unjudged traces too."),
    include_flagged: bool = typer.Option(
        False, "--include-flagged",
        help="Also train on traces whose retrieved text tripped the injection heuristics (dropped and counted by "
             "default, SECURITY.md §4)."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the training rows."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the method's own, see the config docstring)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per optimiser step."),
    max_length: int = typer.Option(
        512, "--max-length",
        help="Tokens per row: longer rows lose whole context exemplars until they fit (never the answer); rows "
             "that still do not fit are dropped and counted."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast."),
    grad_norm_penalty: float = typer.Option(
        0.0, "--grad-norm-penalty", metavar="COEF",
        help="Add COEF·‖∇θ loss‖² to the loss (double backprop, Barrett & Dherin 2021); 0 = off; ~2-3× per step."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    budget_minutes: float | None = typer.Option(None, "--budget-minutes", help="Stop cleanly after this many minutes (the last checkpoint is kept)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
) -> None:
    """Supervised fine-tuning on traces (loss on the model's own tokens only) or on message rows.

    Examples:
      ragloop train sft --traces runs/pal.jsonl --lora --out ckpt/sft
      ragloop ask "What is 6 * 7?" --agent react --save t.jsonl && ragloop train sft --traces t.jsonl --all-traces --lora --out ckpt/sft
      ragloop logs -n 0 --traces logged.jsonl && ragloop train sft --traces logged.jsonl --all-traces --out ckpt/sft
    """
    from ragloop.alignment.data import (
        DropReport,
        filter_traces,
        load_jsonl_rows,
        traces_to_sft_rows,
        validate_sft_rows,
    )
    from ragloop.alignment.sft import SFTConfig, run_sft, sft_report_line
    from ragloop.core.trace import read_traces
    from ragloop.models.loading import load_policy

    _out_dir(out)
    if (traces is None) == (data is None):
        raise UsageError("give exactly one of --traces FILE or --data FILE")
    if sum([lora, full, prompt_tuning]) > 1:
        raise UsageError("choose one of --lora, --full, --prompt-tuning")
    method = "full" if full else "prompt" if prompt_tuning else "lora"
    if traces is not None:
        ts = read_traces(_existing(traces, "trace file"))
        pre = DropReport()
        if not all_traces:
            ts = filter_traces(ts, drop_injection=not include_flagged, report=pre)
        rows, report = traces_to_sft_rows(ts, include_flagged=include_flagged)
        if not all_traces:  # one summary: read = all traces, dropped = filter's reasons + conversion's
            report.read = pre.read
            report.dropped.update(pre.dropped)
        if not rows:
            why = ", ".join(f"{v} {k}" for k, v in sorted(report.dropped.items())) or "the file holds no traces"
            hint = ("traces from ask, logs --traces and serve --capture carry no correctness judgement: add "
                    "--all-traces to train on them as they are (or judge them first, e.g. with eval)"
                    if report.dropped.get("unjudged") or report.dropped.get("incorrect") or
                    report.dropped.get("format_invalid") else "check the trace file")
            raise DataError(f"none of the {report.read} traces in {traces} is usable for SFT ({why})", hint=hint)
    else:
        raw, rep0 = load_jsonl_rows(_existing(data, "data file"))
        rows, report = validate_sft_rows(raw)
        report.dropped.update(rep0.dropped)
    typer.echo(f"data: {report.summary()}", err=True)
    cfg = SFTConfig(out_dir=str(out), method=method, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                    max_length=max_length, bf16=bf16, seed=seed, budget_seconds=_budget(budget_minutes),
                    grad_norm_penalty=grad_norm_penalty)
    res = run_sft(cfg, load_policy(policy), rows, resume=resume, progress=_echo_row())
    typer.echo(sft_report_line(res))


@train_app.command("reward")
def train_reward(
    pairs: Path = typer.Option(..., "--pairs", help="Preference pairs (JSONL: prompt/chosen/rejected, or HH rows)."),
    out: Path = typer.Option(..., "--out", help="Run directory; the model is written to OUT/model."),
    encoder: str | None = typer.Option(None, "--encoder", help="BERT-family encoder dir (default: embedded MiniLM)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the head only."),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training pairs (the best epoch on validation is kept)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the method's own, see the config docstring)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Pairs per optimiser step."),
    max_length: int = typer.Option(256, "--max-length", help="Encoder tokens per prompt+response (longer are cut and counted)."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="The last fraction of rows is held out."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    budget_minutes: float | None = typer.Option(None, "--budget-minutes", help="Stop cleanly after this many minutes (the last checkpoint is kept)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
) -> None:
    """Train a reward model (encoder + linear head, pairwise loss); prints held-out accuracy and AUC.

    Examples:
      ragloop train reward --pairs pairs.jsonl --out ckpt/rm
      ragloop train reward --pairs ../shared/data/hh_rlhf/harmless_base_pairs_dev.jsonl --out ckpt/rm-hh --epochs 1
    """
    from ragloop.alignment.data import load_jsonl_rows, validate_pairs
    from ragloop.alignment.reward import RewardConfig, train_reward_model

    _out_dir(out)
    raw, rep0 = load_jsonl_rows(_existing(pairs, "pairs file"))
    ps, report = validate_pairs(raw)
    report.dropped.update(rep0.dropped)
    typer.echo(f"data: {report.summary()}", err=True)
    cfg = RewardConfig(out_dir=str(out), encoder=encoder, freeze_backbone=freeze_backbone, epochs=epochs, lr=lr,
                       batch_size=batch_size, max_length=max_length, test_fraction=test_fraction, seed=seed,
                       budget_seconds=_budget(budget_minutes))
    res = train_reward_model(cfg, ps, resume=resume, progress=_echo_row(20))
    typer.echo(f"reward model: {res.n_train} train / {res.n_test} held-out pairs, held-out accuracy "
               f"{res.test_accuracy:.3f}, AUC {res.test_auc:.3f} — {res.model_dir}")


@train_app.command("verifier")
def train_verifier(
    traces: Path = typer.Option(..., "--traces", help="Judged traces (JSONL with feedback.correct), several runs per "
                                "question, e.g. the *.samples.jsonl that `ragloop eval ... --samples N` writes."),
    out: Path = typer.Option(..., "--out", help="Run directory; the verifier is written to OUT/model."),
    max_pairs_per_question: int | None = typer.Option(16, "--max-pairs-per-question", min=1,
                                                      help="At most this many (correct, incorrect) pairs per question."),
    encoder: str | None = typer.Option(None, "--encoder", help="BERT-family encoder dir (default: embedded MiniLM)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the head only (seconds; weaker)."),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training pairs (the best epoch on validation is kept)."),
    max_length: int = typer.Option(256, "--max-length", help="Encoder tokens per prompt+response (the prompt is cut "
                                   "from the left, counted)."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="The last fraction of pairs is held out."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    budget_minutes: float | None = typer.Option(None, "--budget-minutes", help="Stop cleanly after this many minutes."),
) -> None:
    """Train an outcome verifier: a reward model on (correct, incorrect) runs of the same question, for
    `ask/eval --select verifier|majority+verifier --verifier OUT` (Cobbe et al. 2021 verifiers).

    A thin wrapper: ``outcome_pairs`` over judged traces, then the same trainer as `train reward`.

    Examples:
      ragloop eval gsm8k --agent pal --limit 100 --samples 8 --out runs/s.jsonl    # writes runs/s.samples.jsonl
      ragloop train verifier --traces runs/s.samples.jsonl --out ckpt/verifier
      ragloop eval gsm8k --agent pal --offset 100 --limit 100 --samples 8 --select majority+verifier --verifier ckpt/verifier
    """
    from ragloop.alignment.data import DropReport, outcome_pairs
    from ragloop.alignment.reward import RewardConfig, train_reward_model
    from ragloop.core.trace import read_traces

    _out_dir(out)
    ts = read_traces(_existing(traces, "trace file"))
    report = DropReport()
    pairs = outcome_pairs(ts, max_pairs_per_question=max_pairs_per_question, report=report)
    judged = [t for t in ts if t.feedback.correct is not None]
    n_right = sum(bool(t.feedback.correct) for t in judged)
    typer.echo(f"data: {len(ts)} traces, {len(judged)} judged ({n_right} correct), "
               f"{len({t.question for t in judged})} questions -> {len(pairs)} pairs"
               + (f" ({report.dropped['injection_flag']} flagged traces left out)" if report.dropped else ""), err=True)
    if len(pairs) < 2:
        why = ("no trace is judged (feedback.correct)" if not judged else
               "no question has both a correct and an incorrect run" if pairs == [] else "only one pair")
        raise DataError(f"{traces}: too few verifier pairs ({why})",
                        hint="sample several judged runs per question, e.g. `ragloop eval gsm8k --samples 8 --out "
                             "runs/s.jsonl`, then --traces runs/s.samples.jsonl")
    cfg = RewardConfig(out_dir=str(out), encoder=encoder, freeze_backbone=freeze_backbone, epochs=epochs,
                       max_length=max_length, test_fraction=test_fraction, seed=seed,
                       budget_seconds=_budget(budget_minutes))
    res = train_reward_model(cfg, pairs, progress=_echo_row(20))
    typer.echo(f"verifier: {res.n_train} train / {res.n_test} held-out pairs, held-out accuracy "
               f"{res.test_accuracy:.3f}, AUC {res.test_auc:.3f} — {res.model_dir}")


@train_app.command("ppo")
def train_ppo(
    policy: str = typer.Option(..., "--policy", help=POLICY_HELP),
    prompts: Path = typer.Option(..., "--prompts", help="JSONL: {'prompt': text or messages, 'gold'?: answer}."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, metrics, the trained policy/)."),
    reward: Path | None = typer.Option(None, "--reward", help="Reward model directory (train reward --out DIR/model)."),
    check: str = typer.Option("none", "--check", help="Programmatic reward: 'none' or 'numeric' (rows' gold)."),
    iterations: int = typer.Option(20, "--iterations", help="PPO iterations (rollout + update each)."),
    batch_prompts: int = typer.Option(8, "--batch-prompts", help="Prompts per iteration."),
    samples: int = typer.Option(2, "--samples", help="Completions per prompt."),
    max_new_tokens: int = typer.Option(128, "--max-tokens", help="Tokens per sampled completion."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate of the policy (LoRA) and value head."),
    kl_coef: float = typer.Option(0.05, "--kl-coef", help="Weight of the KL penalty to the starting policy."),
    adaptive_kl: bool = typer.Option(False, "--adaptive-kl", help="Adapt --kl-coef toward a target KL (Ziegler et al. 2019)."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of a LoRA policy."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    budget_minutes: float | None = typer.Option(None, "--budget-minutes", help="Stop cleanly after this many minutes (the last checkpoint is kept)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
) -> None:
    """PPO against a reward model and/or a programmatic check, with a KL penalty to the starting policy.

    Examples:
      ragloop train ppo --policy ckpt/sft/policy --reward ckpt/rm/model --prompts prompts.jsonl --out ckpt/ppo
      ragloop train ppo --policy default --check numeric --prompts gsm8k_prompts.jsonl --out ckpt/ppo --iterations 5
    """
    from ragloop.alignment.data import load_jsonl_rows
    from ragloop.alignment.ppo import PPOConfig, PPOItem, make_reward_fn, run_ppo
    from ragloop.alignment.reward import load_reward_model
    from ragloop.models.loading import load_policy

    if check not in ("none", "numeric"):
        raise UsageError(f"--check must be 'none' or 'numeric', got {check!r}")
    _out_dir(out)
    raw, rep = load_jsonl_rows(_existing(prompts, "prompts file"))
    items = [PPOItem(prompt=r["prompt"], meta={k: v for k, v in r.items() if k != "prompt"})
             for r in raw if isinstance(r.get("prompt"), str | list) and r["prompt"]]
    if not items:
        raise UsageError(f"no usable rows in {prompts}: each line needs a non-empty 'prompt'")
    if check == "numeric" and any("gold" not in it.meta for it in items):
        raise UsageError("--check numeric needs a 'gold' field on every prompt row")
    rm = load_reward_model(_existing(reward, "reward model")) if reward else None

    def numeric(item: PPOItem, completion: str) -> float:
        from ragloop.eval.metrics import numeric_match

        return 1.0 if numeric_match(completion, str(item.meta["gold"])) == 1.0 else 0.0

    fn = make_reward_fn(reward_model=rm, check=numeric if check == "numeric" else None)
    cfg = PPOConfig(out_dir=str(out), iterations=iterations, batch_prompts=batch_prompts, samples_per_prompt=samples,
                    max_new_tokens=max_new_tokens, lr=lr, kl_coef=kl_coef, adaptive_kl=adaptive_kl, lora=not full,
                    seed=seed, budget_seconds=_budget(budget_minutes))
    res = run_ppo(cfg, load_policy(policy), items, fn, resume=resume, progress=_echo_row(1))
    last = res.history[-1] if res.history else {}
    typer.echo(f"PPO: {res.iterations} iterations, reward {last.get('env/reward_mean', float('nan')):.3f}, "
               f"KL {last.get('objective/kl', float('nan')):.3f}, {res.rollbacks} rollbacks — {res.policy_dir}")


@train_app.command("grpo")
def train_grpo(
    policy: str = typer.Option(..., "--policy", help=POLICY_HELP),
    prompts: Path = typer.Option(..., "--prompts",
                                 help="JSONL, one question per line: {'question': text, 'answer': gold} "
                                      "('prompt'/'gold' are accepted too; the answer may be omitted with --w-correct 0)."),
    out: Path = typer.Option(..., "--out", help="Run directory (metrics, best/ checkpoint, the trained policy/)."),
    agent: str = typer.Option("pal", "--agent", help="The agent whose episodes are rolled out: 'pal' or 'react'."),
    task: str = typer.Option("gsm8k", "--task",
                             help="'gsm8k' (numeric answers; ReAct gets the Calculator) or 'claims' (SUPPORTS/REFUTES/"
                                  "NOT ENOUGH INFO; ReAct searches --index)."),
    index: str | None = typer.Option(None, "--index", help="ReAct on claims: the index to search (name or path)."),
    shots: int = typer.Option(0, "--shots", help="Exemplars in the agent's prompt (0 keeps prompts short)."),
    max_steps: int = typer.Option(4, "--max-steps", help="ReAct: model calls per episode at most."),
    reward: Path | None = typer.Option(None, "--reward", help="Reward model directory (train reward --out DIR/model), added with --w-rm."),
    w_correct: float = typer.Option(1.0, "--w-correct", help="Reward weight of a correct answer (the row's 'answer')."),
    w_format: float = typer.Option(0.1, "--w-format", help="Reward weight of an answer in the agent's own format."),
    w_rm: float = typer.Option(1.0, "--w-rm", help="Reward weight of the reward model's score (with --reward)."),
    advantage: str = typer.Option("grpo", "--advantage", help="'grpo' (group-normalised) or 'rloo' (leave-one-out)."),
    iterations: int = typer.Option(10, "--iterations", help="GRPO iterations (rollout + update each)."),
    batch_questions: int = typer.Option(4, "--batch-questions", help="Questions (groups) per iteration."),
    samples: int = typer.Option(4, "--samples", help="Episodes per question (the group size, >= 2)."),
    max_new_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per model call of an episode."),
    temperature: float = typer.Option(1.0, "--temperature", help="Rollout sampling temperature."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate (LoRA default; ~1e-6..1e-5 with --full)."),
    kl_coef: float = typer.Option(0.04, "--kl-coef", help="Weight of the k3 KL to the starting policy."),
    tis_cap: float = typer.Option(2.0, "--tis-cap",
                                  help="Cap C of the truncated importance weight min(π_train/π_rollout, C) that "
                                       "corrects rollouts from another precision (Yao et al. 2025); 0 = off."),
    rollout_precision: str = typer.Option("fp32", "--rollout-precision",
                                          help="Decode weights of the rollouts: fp32, bf16, int8 or int4 (training stays fp32)."),
    val_n: int | None = typer.Option(None, "--val-n",
                                     help="Keep-best: the last N rows are a validation slice (greedy, every "
                                          "--eval-every iterations); the best weights are the final policy. "
                                          "Default: a fifth of the rows, at most 8. 0 = keep the last."),
    eval_every: int = typer.Option(5, "--eval-every", help="Iterations between validation runs."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of a LoRA policy."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    budget_minutes: float | None = typer.Option(None, "--budget-minutes", help="Stop cleanly after this many minutes (the best checkpoint is kept)."),
) -> None:
    """GRPO/RLOO over agent episodes: several episodes per question, group-normalised advantages, no critic.

    Observation tokens (tool output) are context only; rollouts from another precision are corrected by
    truncated importance sampling; a run that cannot learn (flat rewards, every completion cut, KL blow-up,
    length collapse, validation reward up while accuracy falls) stops with the cause. Exits with code 6 after
    an alarm (the best policy is still written).

    Examples:
      ragloop train grpo --policy ckpt/sft/policy --prompts gsm8k_qa.jsonl --out ckpt/grpo --iterations 5
      ragloop train grpo --policy default --agent react --prompts qa.jsonl --out ckpt/grpo-react --advantage rloo --samples 6
    """
    from ragloop.agents.factory import AgentSpec, build_agent
    from ragloop.alignment.data import load_jsonl_rows
    from ragloop.alignment.grpo import GRPOConfig, GRPOItem, make_episode_reward, run_grpo
    from ragloop.alignment.reward import load_reward_model
    from ragloop.core.errors import TrainingError
    from ragloop.models.loading import load_policy

    if agent not in ("pal", "react"):
        raise UsageError(f"--agent must be 'pal' or 'react', got {agent!r}")
    if task not in ("gsm8k", "claims"):
        raise UsageError(f"--task must be 'gsm8k' or 'claims', got {task!r}")
    if agent == "pal" and task != "gsm8k":
        raise UsageError("--agent pal solves math word problems only", hint="use --task gsm8k, or --agent react")
    if agent == "react" and task == "claims" and index is None:
        raise UsageError("--agent react --task claims needs an index to search", hint="pass --index NAME_OR_PATH")
    if val_n is not None and val_n < 0:
        raise UsageError(f"--val-n must be >= 0, got {val_n}")
    _out_dir(out)
    raw, _ = load_jsonl_rows(_existing(prompts, "prompts file"))
    items = []
    for r in raw:
        q, gold = r.get("question", r.get("prompt")), r.get("answer", r.get("gold"))
        if isinstance(q, str) and q.strip():
            items.append(GRPOItem(question=q, gold=None if gold is None else str(gold)))
    if not items:
        raise UsageError(f"no usable rows in {prompts}: each line needs a non-empty 'question'")
    if w_correct and any(it.gold is None for it in items):
        raise UsageError(f"{sum(it.gold is None for it in items)} rows of {prompts} have no 'answer'",
                         hint="give every row an 'answer', or pass --w-correct 0 (then the reward is format/--reward)")
    if val_n is None:
        val_n = min(8, len(items) // 5)
    if val_n and len(items) - val_n < 1:
        raise UsageError(f"--val-n {val_n} leaves no training questions of {len(items)}", hint="lower --val-n")
    train_items, val_items = (items[:-val_n], items[-val_n:]) if val_n else (items, [])
    retriever = None
    if agent == "react" and task == "claims":
        from ragloop.retrieval import Retriever

        retriever = Retriever.open(index)
    # fallback "none": an episode is the policy's own actions (a CoT fallback would add samples it did not choose)
    spec = AgentSpec(kind=agent, task="math" if task == "gsm8k" else "claims", shots=shots, max_steps=max_steps,  # type: ignore[arg-type]
                     max_new_tokens=max_new_tokens, fallback="none", seed=seed)

    def make_agent(pol: Any, sandbox: Any) -> Any:
        return build_agent(pol, spec, retriever=retriever, sandbox=sandbox)

    rm = load_reward_model(_existing(reward, "reward model")) if reward else None
    fn = make_episode_reward(task=task, w_correct=w_correct, w_format=w_format, reward_model=rm, w_rm=w_rm)
    cfg = GRPOConfig(out_dir=str(out), iterations=iterations, batch_questions=batch_questions, samples=samples,
                     advantage=advantage, task=task, max_new_tokens=max_new_tokens, temperature=temperature,
                     lora=not full, lr=lr, kl_coef=kl_coef, tis_cap=tis_cap or None,
                     rollout_precision=rollout_precision, eval_every=eval_every, seed=seed,
                     budget_seconds=_budget(budget_minutes))
    sandbox = None
    if agent == "pal":
        from ragloop.agents.sandbox import Sandbox

        sandbox = Sandbox()
    res = run_grpo(cfg, load_policy(policy), train_items, make_agent, fn, val_items=val_items, sandbox=sandbox,
                   progress=_echo_row(1))
    last = res.history[-1] if res.history else {}
    best = (f", best validation at iteration {res.best_iteration} (score {res.best_score:.3f})"
            if res.best_iteration is not None else "")
    typer.echo(f"GRPO: {res.iterations} iterations, reward {last.get('grpo/reward_mean', float('nan')):.3f}, "
               f"zero-variance groups {last.get('grpo/zero_std_frac', float('nan')):.2f}, "
               f"KL {last.get('grpo/kl', float('nan')):.4f}{best} — {res.policy_dir}")
    if res.alarm is not None:
        raise TrainingError(f"GRPO stopped: {res.alarm}", hint=f"the best policy so far is in {res.policy_dir}")


# ------------------------------------------------------------------------------------------- CAI/RLAIF


@cai_app.command("revise")
def cai_revise(
    traces: Path = typer.Option(..., "--traces", help="Agent traces (JSONL)."),
    out: Path = typer.Option(..., "--out", help="SFT rows (JSONL) with the revised responses."),
    policy: str | None = typer.Option(None, "--policy", help="Critic/reviser model. " + POLICY_HELP),
    principles: str | None = typer.Option(None, "--principles", help="Comma-separated principle ids (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no library output."),
) -> None:
    """Critique each trace's response under the constitution and revise it; writes SFT rows.

    A revision is kept only if it still works in the agent's format (PAL: the program runs; ReAct: the action
    parses), invents no number or identifier absent from the prompt, evidence and original, drops none of the
    original answer's, and does not loop; rejections are counted by reason.

    Examples:
      ragloop cai revise --traces runs/react.jsonl --out revised.jsonl
      ragloop cai revise --traces runs/pal.jsonl --out revised.jsonl --principles evidence,honest
    """
    from ragloop.alignment.cai import load_constitution, revise_traces
    from ragloop.core.trace import read_traces
    from ragloop.models.loading import load_policy

    _out_file(out)
    ts = read_traces(_existing(traces, "trace file"))
    ids = [p.strip() for p in principles.split(",")] if principles else None
    cons = load_constitution(ids)
    from ragloop.cli.progress import progress_bar, quiet_libraries

    if quiet:
        quiet_libraries()
    pol = load_policy(policy)
    with progress_bar("critique + revise", quiet=quiet, total=len(ts)) as update:
        res = revise_traces(pol, ts, cons, out_path=out, seed=seed, progress=lambda d, n: update(d, n))
    why = ", ".join(f"{k}: {v}" for k, v in sorted(res.rejected.items()))
    rejected = f", {res.n_rejected} revisions rejected ({why})" if res.n_rejected else ", none rejected"
    typer.echo(f"kept {res.revised} revisions of {res.read} traces as SFT rows ({res.unchanged} unchanged{rejected}) → {out}")


@rlaif_app.command("label")
def rlaif_label(
    traces: Path = typer.Option(..., "--traces", help="Agent traces (JSONL); responses to the same question are compared."),
    out: Path = typer.Option(..., "--out", help="Preference pairs (JSONL)."),
    judge: str | None = typer.Option(None, "--judge", help="Judge model (default: the embedded policy). " + POLICY_HELP),
    principle: str | None = typer.Option(None, "--principle", help="Principle id (default: the task's)."),
    max_pairs: int = typer.Option(200, "--max-pairs", help="Judge at most this many pairs (shuffled by --seed)."),
    min_margin: float = typer.Option(0.1, "--min-margin",
                                     help="Pairs whose judge margin |log p(A) - log p(B)|, averaged over both "
                                          "orders, is at most this (nats) are undecided, not labelled. 0 = none."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no library output."),
) -> None:
    """Ask a judge model which of two responses is better under a principle; writes pairs and agreement.

    Agreement with ground truth is printed when the traces carry it (feedback.correct, e.g. from eval).

    Examples:
      ragloop rlaif label --traces runs/a.jsonl --out pairs.jsonl
      ragloop rlaif label --traces runs/a.jsonl --out pairs.jsonl --min-margin 0.5 --judge ckpt/sft/policy
    """
    from ragloop.alignment.cai import label_traces
    from ragloop.core.trace import read_traces
    from ragloop.models.loading import load_policy

    _out_file(out)
    ts = read_traces(_existing(traces, "trace file"))
    from ragloop.cli.progress import progress_bar, quiet_libraries

    if min_margin < 0:
        raise UsageError(f"--min-margin must be >= 0, got {min_margin}")
    if quiet:
        quiet_libraries()
    pol = load_policy(judge)
    with progress_bar("judging pairs", quiet=quiet) as update:
        res = label_traces(pol, ts, out_path=out, principle_id=principle, max_pairs=max_pairs, seed=seed,
                           min_margin=min_margin, progress=lambda d, n: update(d, n))
    if res.n_with_truth:
        agree = (f"; agreement with ground truth {res.agreement:.3f} ({round(res.agreement * res.n_with_truth)}/"
                 f"{res.n_with_truth} decided pairs with one correct and one wrong response)")
    else:
        agree = "; agreement with ground truth not measured (no pair has one correct and one wrong response)"
    typer.echo(f"labelled {res.labelled} pairs, {res.undecided} undecided (|margin| <= {min_margin}){agree} → {out}")


# --------------------------------------------------------------------------------------------- improve


def improve(
    out: Path = typer.Option(..., "--out", help="Output directory (summary.json, table.md, traces/, sft/, rm/, ppo/)."),
    task: str = typer.Option("gsm8k-pal", "--task",
                             help="gsm8k-pal, scifact-react, or custom (your own --questions file)."),
    questions: Path | None = typer.Option(
        None, "--questions",
        help='custom: JSONL, one {"question": ..., "answer": ...} per line (answer: text, a number, or a list of '
             "accepted texts)."),
    agent: str = typer.Option("react", "--agent", help="custom: the agent to improve, react, pal or cot."),
    metric: str = typer.Option("em", "--metric",
                               help="custom: how an answer is scored, em (exact match), f1 (token F1 >= 0.5), "
                                    "numeric, or label."),
    train_split: float = typer.Option(0.8, "--train-split",
                                      help="custom: share of the questions to train on (seeded split); the rest is "
                                           "the held-out slice of the before/after table."),
    samples: int = typer.Option(4, "--samples", help="custom: sampled runs of the agent per training question."),
    budget_minutes: float = typer.Option(60.0, "--budget-minutes", help="Budget for the whole loop (see --budget-clock)."),
    budget_clock: str = typer.Option("cpu", "--budget-clock",
                                     help="'cpu': machine-minutes = CPU time ÷ torch threads (fair on a shared "
                                          "machine); 'wall': wall-clock minutes."),
    policy: str | None = typer.Option(None, "--policy", help=POLICY_HELP),
    eval_n: int | None = typer.Option(None, "--eval-n",
                                      help="Held-out slice: the first N rows of gsm8k/test_dev300.jsonl (default "
                                           "150) or of scifact/claims_train.csv (default 100)."),
    index: str | None = typer.Option(None, "--index",
                                     help="scifact-react: index of the SciFact corpus (default scifact); custom: the "
                                          "index the agent searches (name or path)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The shared data folder (default ../shared/data)."),
    rl: str = typer.Option("ppo", "--rl",
                           help="gsm8k-pal: the RL stage after SFT, ppo, grpo (keep-best on the validation slice) "
                                "or none."),
    no_ppo: bool = typer.Option(False, "--no-ppo", help="Skip the RL stage (SFT only); the same as --rl none."),
    ablate: bool = typer.Option(False, "--ablate",
                                help="gsm8k-pal: run start | SFT only | SFT+GRPO | SFT+PPO from one start and one "
                                     "budget, each arm the same training minutes, on the same held-out slice; the "
                                     "arm best on the validation slice is final, then + verifier@8 (table.md)."),
    val_n: int = typer.Option(50, "--val-n",
                              help="gsm8k-pal: validation questions from gsm8k/train.jsonl, held out from every "
                                   "training stage; GRPO's keep-best and the ablation's choice are made on them."),
    collect_questions: int = typer.Option(16, "--collect-questions",
                                          help="gsm8k-pal: training questions sampled (4 runs each) with the start "
                                               "policy for SFT, and again with the SFT policy for reward-model pairs."),
    verifier_samples: int = typer.Option(8, "--verifier-samples",
                                         help="--ablate: samples per test question for the verifier@N row (0: not "
                                              "run)."),
    no_rm: bool = typer.Option(False, "--no-rm", help="Skip the reward model (PPO then uses the programmatic check)."),
    lora: bool = typer.Option(False, "--lora", help="LoRA SFT instead of full fine-tuning."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the run manifest; same seed, same result)."),
    evaluate_only: str | None = typer.Option(None, "--evaluate-only", metavar="TAG",
                                             help="gsm8k-pal: only run the loop's held-out evaluation of --policy "
                                                  "(e.g. a run's checkpoint); writes OUT/eval-TAG.json."),
) -> None:
    """The whole loop: baseline eval → collect → filter/critique → SFT → reward model → PPO or GRPO → eval again.
    The budget is planned after the baseline's first batch: evaluations and collection are set aside, at least
    60% goes to training, and a budget too small to train is refused at once with what to change.
    --ablate compares start, SFT only, SFT+GRPO and SFT+PPO at equal training minutes (OUT/table.md).
    With --task scifact-react: baseline ReAct eval → teacher traces → SFT → eval again. With --task custom:
    your questions, split into train and held-out (recorded in OUT/split.json) → baseline eval → the agent's
    own correct traces on the train part → SFT → eval again (gold answers required).

    Examples:
      ragloop improve --task gsm8k-pal --budget-minutes 60 --out runs/improve-1
      ragloop improve --task gsm8k-pal --rl grpo --budget-minutes 60 --out runs/improve-grpo
      ragloop improve --ablate --budget-minutes 60 --eval-n 150 --out runs/ablation
      ragloop improve --task scifact-react --index scifact --budget-minutes 35 --out runs/improve-sf
      ragloop improve --task custom --questions qa.jsonl --index mydocs --agent react --metric f1 --out runs/mine
    """
    from ragloop.alignment.improve import ImproveConfig, evaluate_slice, run_improve

    _out_dir(out)
    if task == "custom":
        from ragloop.alignment.custom_task import CustomTaskConfig, run_custom_task

        if questions is None:
            raise UsageError("--task custom needs --questions FILE",
                             hint='a JSONL file with one {"question": ..., "answer": ...} per line')
        if evaluate_only is not None or ablate:
            raise UsageError(f"{'--ablate' if ablate else '--evaluate-only'} is for --task gsm8k-pal")
        ccfg = CustomTaskConfig(out_dir=str(out), questions=str(_existing(questions, "questions file")), agent=agent,
                                metric=metric, index=index, train_split=train_split, policy=policy, seed=seed,
                                budget_minutes=budget_minutes, budget_clock=budget_clock,
                                sft_method="lora" if lora else "full", samples=samples)
        summary = run_custom_task(ccfg, progress=lambda msg: typer.echo(msg, err=True))
        typer.echo(summary["table"])
        typer.echo(f"held-out rows {summary['split']['held_out_rows']} (seed {seed}); final policy: "
                   f"{summary['policy'] or 'unchanged (no SFT)'}  (summary: {out / 'summary.json'})")
        return
    if no_ppo and rl not in ("ppo", "none"):
        raise UsageError(f"--no-ppo and --rl {rl} contradict each other", hint="give one of them")
    cfg = ImproveConfig(out_dir=str(out), task=task, budget_minutes=budget_minutes, budget_clock=budget_clock,
                        policy=policy, eval_n=eval_n if eval_n is not None else (100 if task == "scifact-react" else 150), index=index or "scifact",
                        data_dir=str(data_dir) if data_dir else None, rl="none" if no_ppo else rl, rm=not no_rm,
                        ablate=ablate, val_n=val_n, verifier_samples=verifier_samples,
                        collect_questions=collect_questions, rm_questions=collect_questions,
                        sft_method="lora" if lora else "full", seed=seed)
    if evaluate_only is not None:
        res = evaluate_slice(cfg, tag=evaluate_only, progress=lambda msg: typer.echo(msg, err=True))
        typer.echo(json.dumps(res, default=str))
        return
    summary = run_improve(cfg, progress=lambda msg: typer.echo(msg, err=True))
    typer.echo(summary["table"])
    b = summary.get("budget")
    used = f"; used {b['used']:.1f} of {b['asked']:g} min ({b['clock']} clock)" if b else ""
    stage = f"final stage: {summary['final_stage']} (chosen on validation) · " if summary.get("final_stage") else ""
    typer.echo(f"{stage}final policy: {summary['policy']}{used}  (summary: {out / 'summary.json'})")


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
    app.add_typer(cai_app, name="cai")
    app.add_typer(rlaif_app, name="rlaif")
    app.command("improve")(improve)
