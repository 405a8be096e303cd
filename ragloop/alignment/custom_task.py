"""``ragloop improve --task custom``: the user's own questions make the same local model a better agent.

The recipe is the improve loop's (``ragloop.alignment.improve``), on any JSONL of ``{"question", "answer"}``:

1. split: a seeded shuffle of the rows into a train part (``train_split``) and a held-out part; the held-out
   row numbers are recorded in ``split.json`` and the summary, so the before/after figures are reproducible
   and no training question is ever evaluated;
2. baseline: greedy runs of the agent (``react`` | ``pal`` | ``cot``) on the held-out questions, scored by the
   chosen metric (``em``, ``f1`` ≥ ``f1_threshold``, ``numeric`` match, or ``label`` equality);
3. collect: ``samples`` sampled runs per training question on the batched runtime (``run_agent_batched``),
   on as many training questions as ``collect_share`` of the budget buys (estimated from the baseline's cost,
   and said when it is fewer than all), scored against the gold answers; the correct, well-formed traces with no injection flag are kept — the
   agent's own successes, i.e. rejection-sampling fine-tuning / STaR (Zelikman et al. 2022, "STaR:
   Bootstrapping Reasoning With Reasoning");
4. SFT on those traces (loss on the model's own tokens only), within what the budget leaves after reserving
   the final evaluation;
5. evaluate again on the same held-out questions; ``summary.json`` keeps ``before`` and ``after`` (accuracy,
   Wilson 95% CI, n, format validity) and the final policy path, ``table.md`` the table.

Gold answers are required. Rows without one are dropped and counted; a file with none is refused: the reward
for questions without answers would be a judge model, and the embedded 135M judge agrees with ground truth
about a quarter of the time (issue 11), too weak to select training data honestly.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragloop.alignment.budget import CLOCKS, make_clock
from ragloop.alignment.data import DropReport, file_sha256, filter_traces, load_jsonl_rows, traces_to_sft_rows
from ragloop.core.errors import ConfigError, DataError, UsageError
from ragloop.core.trace import Trace, write_traces
from ragloop.models.types import GenerationConfig

log = logging.getLogger(__name__)

AGENTS = ("react", "pal", "cot")
METRICS = ("em", "f1", "numeric", "label")


@dataclass
class CustomTaskConfig:
    """Settings of ``improve --task custom``; every field is validated in ``__post_init__``."""

    out_dir: str
    questions: str  # JSONL: one {"question": str, "answer": str | number | [str, ...]} per line
    agent: str = "react"  # react | pal | cot
    metric: str = "em"  # em | f1 | numeric | label
    index: str | None = None  # the agent's index (name or path); ReAct on em/f1/label questions needs one
    train_split: float = 0.8  # share of rows to train on; the rest is the held-out slice
    policy: str | None = None  # policy spec (None = the embedded SmolLM2)
    seed: int = 0  # the split, the sampling and SFT
    budget_minutes: float = 30.0
    budget_clock: str = "cpu"
    samples: int = 4  # sampled runs per training question
    temperature: float = 0.8  # of the sampled runs
    max_new_tokens: int | None = None  # per model call (None: the agent's default)
    shots: int | None = None  # in-context exemplars (None: the agent's default)
    f1_threshold: float = 0.5  # metric f1: an answer with token F1 ≥ this is correct
    sft_method: str = "lora"  # lora | full
    sft_lr: float | None = None  # None: the method's default
    sft_epochs: int = 2
    sft_batch: int = 8
    sft_max_length: int = 512  # longer rows lose context exemplars (masking.tokenize_rows), never the answer
    eval_batch: int = 16  # episodes decoded together
    collect_share: float = 0.4  # of the budget left after the evaluations, at most, for sampling traces

    def __post_init__(self) -> None:
        if self.agent not in AGENTS:
            raise UsageError(f"--agent must be one of {', '.join(AGENTS)} for a custom task, got {self.agent!r}")
        if self.metric not in METRICS:
            raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not 0.0 < self.train_split < 1.0:
            raise UsageError(f"--train-split must be between 0 and 1 (exclusive), got {self.train_split}",
                             hint="e.g. 0.8: train on 80% of the questions, evaluate on the other 20%")
        if self.budget_minutes <= 0:
            raise UsageError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        if self.budget_clock not in CLOCKS:
            raise UsageError(f"--budget-clock must be one of {', '.join(CLOCKS)}, got {self.budget_clock!r}")
        if not 0.0 < self.collect_share < 1.0:
            raise ConfigError(f"collect_share must be in (0, 1), got {self.collect_share}")
        if self.samples < 1:
            raise UsageError(f"--samples must be >= 1, got {self.samples}")
        if self.sft_method not in ("lora", "full"):
            raise ConfigError(f"sft_method must be 'lora' or 'full', got {self.sft_method!r}")
        if self.agent == "pal" and self.metric != "numeric":
            raise UsageError("the pal agent answers with the value its program returns: use --metric numeric",
                             hint="or choose --agent react/cot for text answers")


# ------------------------------------------------------------------------------------------------ data


@dataclass
class QARow:
    row: int  # 1-based position among the file's JSON objects (blank and unparsable lines not counted)
    question: str
    answer: str | list[str]


def read_questions(path: str | Path) -> tuple[list[QARow], DropReport]:
    """The usable rows of a questions file, with counts of the rest (``missing_question``,
    ``missing_answer``, ``bad_answer`` and load_jsonl_rows's reasons). A file with no gold answer at all is a
    DataError (see the module docstring)."""
    raw, report = load_jsonl_rows(path)
    rows: list[QARow] = []
    kept = DropReport(read=report.read, dropped=report.dropped)
    for pos, obj in enumerate(raw, 1):
        q = obj.get("question")
        a = obj.get("answer")
        if not isinstance(q, str) or not q.strip():
            kept.drop("missing_question")
        elif a is None or (isinstance(a, str) and not a.strip()):
            kept.drop("missing_answer")
        elif isinstance(a, bool) or not isinstance(a, str | int | float | list) or (
                isinstance(a, list) and not (a and all(isinstance(x, str) and x.strip() for x in a))):
            kept.drop("bad_answer")
        else:
            rows.append(QARow(row=pos, question=q.strip(),
                              answer=[x.strip() for x in a] if isinstance(a, list) else str(a).strip()))
    kept.kept = len(rows)
    if not rows and kept.dropped.get("missing_answer"):
        raise DataError(f"{path}: no row has a gold 'answer' ({kept.summary()})",
                        hint='write one {"question": ..., "answer": ...} per line; a custom task is scored against '
                             "gold answers (a judge-only reward is not offered: the embedded judge is too weak)")
    if not rows:
        raise DataError(f"{path}: no usable question ({kept.summary()})",
                        hint='write one {"question": ..., "answer": ...} per line')
    return rows, kept


def split_rows(rows: Sequence[QARow], train_split: float, seed: int) -> tuple[list[QARow], list[QARow]]:
    """(train, held-out): a seeded shuffle, then the first ``round(n · train_split)`` rows train; each part
    keeps at least one row. ``split_rows(5 rows, 0.8, 0)`` → 4 train, 1 held out."""
    if len(rows) < 2:
        raise DataError(f"a custom task needs at least 2 questions (one to train on, one to evaluate), got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_train = min(len(rows) - 1, max(1, round(len(rows) * train_split)))
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train:]]


def is_correct(answer: str | None, gold: str | list[str], metric: str, *, f1_threshold: float = 0.5) -> bool:
    """The metric's verdict on one answer: ``is_correct("The Beatles", "beatles", "em") -> True``,
    ``is_correct("18 dollars", "18", "numeric") -> True``, ``is_correct("supports", "SUPPORTS", "label") -> True``."""
    from ragloop.eval.metrics import exact_match, f1_score, numeric_match

    if answer is None or not answer.strip():
        return False
    golds = gold if isinstance(gold, list) else [gold]
    if metric == "em":
        return exact_match(answer, golds) == 1.0
    if metric == "f1":
        return f1_score(answer, golds) >= f1_threshold
    if metric == "numeric":
        return any(numeric_match(answer, g) == 1.0 for g in golds)
    if metric == "label":
        return any(" ".join(answer.split()).upper().rstrip(".") == " ".join(g.split()).upper() for g in golds)
    raise ConfigError(f"unknown metric {metric!r}")


def score(trace: Trace, row: QARow, cfg: CustomTaskConfig) -> Trace:
    trace.feedback.gold = row.answer if isinstance(row.answer, str) else " | ".join(row.answer)
    trace.feedback.correct = is_correct(trace.answer, row.answer, cfg.metric, f1_threshold=cfg.f1_threshold)
    return trace


# ------------------------------------------------------------------------------------------------ agent


def agent_factory(cfg: CustomTaskConfig, retriever: Any = None) -> Callable[[Any, Any], Any]:
    """``make(policy, sandbox) -> agent``: the agent the user chose, on the task family its metric implies
    (numeric → math tools and exemplars, label → claims, em/f1 → question answering over the index)."""
    from ragloop.agents.factory import AgentSpec, build_agent

    task = {"numeric": "math", "label": "claims"}.get(cfg.metric, "qa")
    spec = AgentSpec(kind=cfg.agent, task=task, shots=cfg.shots, max_new_tokens=cfg.max_new_tokens,  # type: ignore[arg-type]
                     seed=cfg.seed, fallback="none")

    def make(policy: Any, sandbox: Any) -> Any:
        return build_agent(policy, spec, retriever=retriever, sandbox=sandbox)

    return make


def _table(before: dict[str, Any], after: dict[str, Any], metric: str, kl: float) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def ci(c: Sequence[float]) -> str:
        return f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"

    rows = [
        (f"accuracy ({metric})", pct(before["accuracy"]), pct(after["accuracy"])),
        ("95% CI (Wilson)", ci(before["ci95"]), ci(after["ci95"])),
        ("correct / n", f"{before['correct']} / {before['n']}", f"{after['correct']} / {after['n']}"),
        ("format valid", pct(before["format_valid"]), pct(after["format_valid"])),
        ("mean steps", f"{before['mean_steps']:.2f}", f"{after['mean_steps']:.2f}"),
        ("KL to start (nats/token)", "0", f"{kl:.4f}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'metric':<{w}} | before | after |", f"|{'-' * (w + 2)}|--------|-------|"]
    return "\n".join(lines + [f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows])


# ------------------------------------------------------------------------------------------------- loop


def run_custom_task(cfg: CustomTaskConfig, *, policy: Any = None, retriever: Any = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the loop (module docstring); returns the summary, also written to ``<out>/summary.json``.
    ``policy`` / ``retriever`` may be passed in (tests use the tiny model); otherwise ``cfg.policy`` and
    ``cfg.index`` are loaded."""
    from ragloop.agents.sandbox import Sandbox
    from ragloop.alignment.collect import run_agent_batched, summarize
    from ragloop.alignment.improve import kl_to_reference
    from ragloop.alignment.sft import SFTConfig, run_sft

    say = progress or (lambda msg: log.info(msg))
    now = make_clock(cfg.budget_clock)
    t_start, wall0 = now(), time.perf_counter()
    budget = cfg.budget_minutes * 60.0
    out = Path(cfg.out_dir)
    (out / "traces").mkdir(parents=True, exist_ok=True)

    rows, data_report = read_questions(cfg.questions)
    if cfg.agent == "react" and cfg.metric != "numeric" and retriever is None and not cfg.index:
        raise UsageError(f"the react agent answers {cfg.metric} questions by searching an index: pass --index",
                         hint="index your documents first (ragloop index DOCS --index NAME), or use --metric numeric")
    train, held_out = split_rows(rows, cfg.train_split, cfg.seed)
    split = {"seed": cfg.seed, "train_split": cfg.train_split, "n_train": len(train), "n_held_out": len(held_out),
             "held_out_rows": sorted(r.row for r in held_out), "train_rows": sorted(r.row for r in train),
             "questions": str(cfg.questions), "questions_sha256": file_sha256(cfg.questions)}
    (out / "split.json").write_text(json.dumps(split, indent=1), encoding="utf-8")
    say(f"questions: {data_report.summary()}; {len(train)} to train on, {len(held_out)} held out (seed {cfg.seed})")

    if retriever is None and cfg.index:
        from ragloop.retrieval.retriever import Retriever

        retriever = Retriever.open(cfg.index)
    make = agent_factory(cfg, retriever)
    if policy is None:
        from ragloop.models.loading import load_policy

        policy = load_policy(cfg.policy)
    make(policy, None)  # build once: a missing index or a bad combination fails before any model call
    start_name = policy.name
    ref_model = copy.deepcopy(policy.model).eval()  # KL to start is measured against it
    sandbox = Sandbox() if cfg.agent == "pal" else None

    def evaluate(tag: str) -> tuple[dict[str, Any], list[Trace]]:
        t0, c0 = time.perf_counter(), now()
        traces = [ts[0] for ts in run_agent_batched(make, policy, [r.question for r in held_out], sandbox=sandbox,
                                                    batch_size=cfg.eval_batch)]
        for t, r in zip(traces, held_out, strict=True):
            score(t, r, cfg)
        write_traces(out / "traces" / f"eval-{tag}.jsonl", traces)
        s = summarize(traces, seconds=time.perf_counter() - t0).to_dict()
        s.update(policy=policy.name, budget_seconds=round(now() - c0, 1))
        say(f"eval ({tag}): {s['correct']}/{s['n']} correct ({100 * s['accuracy']:.1f}%, {cfg.metric}), "
            f"format valid {100 * s['format_valid']:.1f}%, {s['seconds']:.0f} s")
        return s, traces

    stages: dict[str, Any] = {}
    before, _ = evaluate("before")
    # collect: the agent's own sampled runs on the training questions, scored. It gets at most
    # ``collect_share`` of what the budget leaves after both evaluations, estimated from the baseline's cost per
    # episode (sampled episodes batch as well or better, so the estimate errs on the safe side); the rest trains
    reserve = before["budget_seconds"] * 1.2 + 5.0  # the final evaluation: at most the baseline's, plus slack
    per_episode = before["budget_seconds"] / max(1, len(held_out))
    affordable = int(cfg.collect_share * (budget - (now() - t_start) - reserve) / max(1e-6, per_episode * cfg.samples))
    if affordable < len(train):
        say(f"collect: the budget buys about {max(affordable, 0)} of {len(train)} training questions × {cfg.samples} "
            f"samples ({per_episode:.1f} s per episode); raise --budget-minutes to use them all")
        train = train[: max(1, affordable)]
    t0 = now()
    dec = GenerationConfig(max_new_tokens=cfg.max_new_tokens or (128 if cfg.agent == "react" else 256), temperature=cfg.temperature, top_p=0.95,
                           seed=cfg.seed)
    groups = run_agent_batched(make, policy, [r.question for r in train], samples=cfg.samples, decoding=dec,
                               sandbox=sandbox, batch_size=max(1, cfg.eval_batch // cfg.samples))
    collected = [score(t, r, cfg) for r, ts in zip(train, groups, strict=True) for t in ts]
    write_traces(out / "traces" / "collect.jsonl", collected)
    filt = DropReport()
    kept = filter_traces(collected, report=filt)
    sft_rows, conv = traces_to_sft_rows(kept)
    stages["collect"] = {"questions": len(train), "traces": len(collected), "correct": sum(1 for t in collected if t.feedback.correct),
                         "questions_solved": sum(1 for ts in groups if any(t.feedback.correct for t in ts)),
                         "filter": filt.to_dict(), "rows": len(sft_rows), "seconds": round(now() - t0, 1)}
    say(f"collect: {len(collected)} traces on {len(train)} questions, {stages['collect']['correct']} correct; "
        f"{len(sft_rows)} SFT rows ({filt.summary()})")

    policy_dir: str | None = None
    sft_budget = budget - (now() - t_start) - reserve
    if not sft_rows:
        stages["sft"] = {"skipped": "no correct trace to learn from"}
        say("SFT skipped: the agent solved none of the training questions (the policy is unchanged); try more "
            "--samples, more questions, or a stronger --policy")
    elif sft_budget < 10.0:
        stages["sft"] = {"skipped": f"budget: {max(sft_budget, 0) / 60:.2f} min left for training"}
        say(f"SFT skipped: the budget leaves {max(sft_budget, 0) / 60:.2f} min after the evaluations; raise "
            "--budget-minutes")
    else:
        say(f"SFT on {len(sft_rows)} rows of the agent's own correct traces, budget {sft_budget / 60:.1f} min")
        sft_cfg = SFTConfig(out_dir=str(out / "sft"), method=cfg.sft_method, lr=cfg.sft_lr, epochs=cfg.sft_epochs,
                            batch_size=min(cfg.sft_batch, len(sft_rows)), max_length=cfg.sft_max_length,
                            seed=cfg.seed, budget_seconds=sft_budget, budget_clock=cfg.budget_clock,
                            name=f"{start_name}-custom-sft")
        res = run_sft(sft_cfg, policy, sft_rows)
        policy.name = f"{start_name}-custom-sft"
        policy_dir = str(res.policy_dir) if res.policy_dir else None
        stages["sft"] = {"steps": res.steps, "final_loss": res.final_loss, "stopped_by": res.stopped_by,
                         "rows": len(sft_rows), "data": res.data_report, "policy": policy_dir,
                         "conversion": conv.to_dict()}
    after, after_traces = evaluate("after")
    kl = kl_to_reference(policy, ref_model, after_traces) if policy_dir else 0.0
    del ref_model
    table = _table(before, after, cfg.metric, kl)
    summary = {
        "task": "custom", "agent": cfg.agent, "metric": cfg.metric, "reward": f"gold answers ({cfg.metric})",
        "split": split, "data": data_report.to_dict(), "before": before, "after": after, "kl_to_start": kl,
        "policy": policy_dir, "start_policy": start_name, "final_stage": "sft" if policy_dir else "start",
        "budget": {"asked_minutes": cfg.budget_minutes, "clock": cfg.budget_clock,
                   "used_minutes": round((now() - t_start) / 60, 2),
                   "wall_minutes": round((time.perf_counter() - wall0) / 60, 2)},
        "stages": stages, "config": asdict(cfg), "table": table,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    return summary


__all__ = ["CustomTaskConfig", "QARow", "read_questions", "split_rows", "is_correct", "run_custom_task", "AGENTS",
           "METRICS"]
