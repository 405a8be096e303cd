"""``ragloop improve --task scifact-react``: teach the local model ReAct's action format on SciFact claims.

The ReAct agent (Yao et al. 2023) needs the model to end each step with a line ``Action i: Tool[argument]``;
the embedded SmolLM2-135M-Instruct rarely writes one. The loop:

1. *before*: the ReAct claims agent — built by ``ragloop.agents.factory.build_agent`` exactly as
   ``ragloop eval claims --agent react`` builds it, with the loop's prompt settings — runs greedily on the
   held-out slice, the first ``eval_n`` claims of SciFact ``claims_train.csv`` (Wadden et al. 2020), and is
   scored (``ragloop.eval.runners``: accuracy with a Wilson 95% interval, format validity) plus the
   valid-action rates below;
2. *teacher traces* on other claims of the same file (disjoint from the slice): the real agent, the real
   retriever over the real index, and a teacher policy that plays two steps — ``Search[<the claim>]``, then
   after the real observation ``Finish[SUPPORT|CONTRADICT|NOT ENOUGH INFO]`` with the CSV's label (no
   evidence document → NOT ENOUGH INFO). The prompt and the observation are the agent's own. A claim whose
   evidence rows disagree is skipped; a SUPPORT/CONTRADICT claim whose evidence abstract is not the
   passage the search shows is skipped too (the teacher's thought would otherwise cite evidence the
   observation does not hold); every drop is counted;
3. SFT (``run_sft``) on those traces (``traces_to_sft_rows``: only the model's own steps are trained — the
   system prompt, the claim and every observation are masked out), within the budget;
4. *after*: the same evaluation with the fine-tuned policy; ``summary.json``, ``table.md`` and every trace.

**Valid-action rate** (per step): over the ReAct steps for which the model generated text, the fraction
whose Action line the parser read *strictly* — no parser repair of any kind, including the agent's
re-ask for a missing action line — as ``Search``, ``Lookup`` or ``Finish`` with a non-empty argument.
**Valid-finish rate** (per trace): the fraction of claims whose run ended with such a strictly valid
``Finish`` step. ``format_valid_strict`` (``ragloop.eval.runners``) is stricter still: a valid finish and
no step of the trace failed to parse or needed a repair.

Budget: ``budget_minutes`` on the chosen clock (``budget.py``; "cpu" counts machine-minutes at the run's
thread count). The after-evaluation's cost is estimated from the baseline's cost per generated token and
the teacher's trace length, and reserved; SFT gets what is left.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragloop.alignment.budget import make_clock
from ragloop.alignment.data import DropReport, traces_to_sft_rows
from ragloop.core.errors import ConfigError, DataError, UsageError
from ragloop.core.trace import Feedback, Step, Trace, write_traces
from ragloop.models.types import Generation

log = logging.getLogger(__name__)

ACTIONS = ("Search", "Lookup", "Finish")
_LABELS = {"SUPPORT": "SUPPORT", "CONTRADICT": "CONTRADICT"}
NEI = "NOT ENOUGH INFO"
THOUGHT_SEARCH = "I need evidence about this claim, so I will search the documents for it."
THOUGHT_FINISH = {
    "SUPPORT": "The passage I found reports results that support the claim.",
    "CONTRADICT": "The passage I found reports results that contradict the claim.",
    NEI: "The passage I found does not give enough evidence to decide the claim.",
}


@dataclass
class ReactImproveConfig:
    """Settings of the SciFact-ReAct loop. The prompt settings are used unchanged before and after."""

    out_dir: str
    policy: str | None = None  # policy spec (None = the embedded SmolLM2-135M-Instruct)
    index: str = "scifact"  # index of the SciFact corpus (name under ~/.ragloop/indexes, or a path)
    budget_minutes: float = 35.0
    budget_clock: str = "cpu"
    seed: int = 0
    data_dir: str | None = None
    claims_file: str = "scifact/claims_train.csv"  # under data_dir
    eval_n: int = 100  # the held-out slice: the first eval_n claims
    # prompt settings (ragloop eval claims --agent react --shots 0 --max-steps 3 --max-new-tokens 80
    # --fallback none --prompt-style chat): no exemplars makes both evaluation and training much cheaper
    shots: int = 0
    max_steps: int = 3
    max_new_tokens: int = 80
    prompt_style: str = "chat"
    fallback: str = "none"  # no CoT fallback: the measure is the model's own ReAct steps
    teacher_n: int = 400  # at most this many teacher claims are tried
    require_evidence_shown: bool = True  # drop SUPPORT/CONTRADICT traces whose shown passage is not the evidence
    sft_method: str = "full"
    sft_lr: float = 1e-4
    sft_batch: int = 4  # micro-batch; × sft_grad_accum = 8 rows per step (a full-vocabulary logits tensor of
    sft_grad_accum: int = 2  # 8 × ~500 tokens is ~0.8 GB in fp32: halving the micro-batch halves that peak)
    sft_max_length: int = 768
    sft_bf16: bool | None = None  # bf16 autocast; None: only where the CPU does bf16 natively (models.cpu)
    sft_epochs: int = 1
    general_n: int = 8  # held-out general chat rows for the forgetting probe (0 = none)
    reserve_seconds: float = 30.0  # kept free besides the after-evaluation
    min_sft_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.budget_minutes <= 0:
            raise ConfigError("budget_minutes must be > 0")
        if self.eval_n < 1 or self.teacher_n < 1:
            raise ConfigError("eval_n and teacher_n must be >= 1")
        if self.budget_clock not in ("wall", "cpu"):
            raise ConfigError("budget_clock must be 'wall' or 'cpu'")
        if self.sft_method not in ("full", "lora"):
            raise ConfigError("sft_method must be 'full' or 'lora'")
        if self.prompt_style not in ("chat", "raw"):
            raise ConfigError("prompt_style must be 'chat' or 'raw'")

    def agent_spec(self) -> Any:
        from ragloop.agents.factory import AgentSpec

        return AgentSpec(kind="react", task="claims", shots=self.shots, max_new_tokens=self.max_new_tokens,
                         max_steps=self.max_steps, prompt_style=self.prompt_style, seed=self.seed,
                         fallback=self.fallback)  # type: ignore[arg-type]

    def eval_command(self, policy: str) -> str:
        """The ``ragloop eval claims`` command that runs the same agent on the same slice."""
        return (f"ragloop eval claims --agent react --index {self.index} --policy {policy} --limit {self.eval_n} "
                f"--shots {self.shots} --max-steps {self.max_steps} --max-new-tokens {self.max_new_tokens} "
                f"--prompt-style {self.prompt_style} --fallback {self.fallback} --seed {self.seed}")


# ------------------------------------------------------------------------------------------ metrics


def step_action_valid(step: Step) -> bool | None:
    """Strictly valid action line (see the module docstring); None when the model generated nothing."""
    if step.raw_output is None:
        return None
    if step.action is None or step.repairs or step.action.name not in ACTIONS:
        return False
    return any(str(v).strip() for v in step.action.arguments.values())


def valid_finish(trace: Trace) -> bool:
    """The run ended with a strictly valid ``Finish`` step written by the model."""
    if not trace.finished or trace.fallback is not None or not trace.steps:
        return False
    last = trace.steps[-1]
    return bool(step_action_valid(last)) and last.action is not None and last.action.name == "Finish"


def action_metrics(traces: Sequence[Trace]) -> dict[str, Any]:
    """``valid_action_rate`` (per step), ``valid_finish_rate`` (per trace) and their counts."""
    marks = [v for t in traces for s in t.steps if (v := step_action_valid(s)) is not None]
    fin = sum(valid_finish(t) for t in traces)
    n = len(traces)
    return {"valid_action_rate": sum(marks) / len(marks) if marks else 0.0, "valid_steps": sum(marks),
            "model_steps": len(marks), "valid_finish_rate": fin / n if n else 0.0, "valid_finishes": fin,
            "mean_steps": sum(len(t.steps) for t in traces) / n if n else 0.0}


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TeacherClaim:
    """A claim with its single label (SUPPORT / CONTRADICT / NOT ENOUGH INFO) and evidence documents."""

    id: str
    claim: str
    label: str
    evidence_docs: tuple[str, ...]


def read_teacher_claims(path: Path, report: DropReport, *, exclude: set[str] | frozenset[str] = frozenset()
                        ) -> list[TeacherClaim]:
    """Every claim of ``claims_train.csv`` (but the ids in ``exclude``) with all its evidence rows merged;
    claims whose rows disagree on the label are dropped and counted (``conflicting_labels``)."""
    if not path.is_file():
        raise DataError(f"claims file not found: {path}", hint="set RAGLOOP_DATA or --data-dir to the shared data folder")
    rows: dict[str, list[dict[str, str]]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        need = {"id", "claim", "evidence_doc_id", "evidence_label"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise DataError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for r in reader:
            if r["id"] not in exclude:
                rows.setdefault(r["id"], []).append(r)
    out: list[TeacherClaim] = []
    for cid, rs in rows.items():
        report.read += 1
        claim = rs[0]["claim"].strip()
        labels = set()
        docs: list[str] = []
        for r in rs:
            doc, lab = (r["evidence_doc_id"] or "").strip(), (r["evidence_label"] or "").strip().upper()
            if not doc:
                labels.add(NEI)
            elif lab in _LABELS:
                labels.add(_LABELS[lab])
                docs.append(doc)
            else:
                labels.add(f"?{lab}")
        if not claim:
            report.drop("empty_claim")
        elif len(labels) != 1 or next(iter(labels)).startswith("?"):
            report.drop("conflicting_labels")
        else:
            out.append(TeacherClaim(cid, claim, labels.pop(), tuple(dict.fromkeys(docs))))
    return out


def search_query(claim: str) -> str:
    """The claim as a search query: one line, square brackets (the action syntax) turned into parentheses."""
    return " ".join(claim.replace("[", "(").replace("]", ")").split()).rstrip(" .")


def teacher_steps(claim: str, label: str, *, fits: Callable[[str], bool]) -> tuple[str, str] | None:
    """The two step texts the teacher writes after the agent's ``Thought i:`` prefix; the query is the
    claim, or its longest leading word span whose step ``fits`` the per-step token budget (None if none)."""
    words = search_query(claim).split()
    for n in range(len(words), min(len(words), 4) - 1, -1):  # at least 4 words (or the whole claim)
        step1 = f" {THOUGHT_SEARCH}\nAction 1: Search[{' '.join(words[:n])}]"
        if fits(step1):
            return step1, f" {THOUGHT_FINISH[label]}\nAction 2: Finish[{label}]"
    return None


class _ShownDocs:
    """A search backend that records which document each search showed first (delegates to the real one)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.top_docs: list[str] = []

    def search(self, query: str, k: int) -> Any:
        hits = self.backend.search(query, k)
        self.top_docs.append(hits[0].doc_id if hits else "")
        return hits

    def document(self, doc_id: str) -> str | None:
        return self.backend.document(doc_id)


def build_teacher_traces(policy: Any, retriever: Any, claims: Sequence[TeacherClaim], cfg: ReactImproveConfig,
                         report: DropReport) -> list[Trace]:
    """Teacher traces through the real agent and retriever (see the module docstring)."""
    from ragloop.agents.docsearch import RetrieverBackend
    from ragloop.agents.factory import build_agent
    from ragloop.agents.runtime import replay

    spec = cfg.agent_spec()
    out: list[Trace] = []
    for c in claims:
        report.read += 1
        steps = teacher_steps(c.claim, c.label, fits=lambda s: len(policy.tokenize(s)) <= cfg.max_new_tokens)
        if steps is None:
            report.drop("step_too_long")
            continue
        shown = _ShownDocs(RetrieverBackend(retriever))
        # the teacher's step texts play the model's calls through the agent's own loop (runtime.replay)
        answers = [[Generation(text=s, token_ids=policy.tokenize(s), finish_reason="stop")] for s in steps]
        try:
            t = replay(build_agent(policy, spec, search_backend=shown), c.claim, answers, task="claims")
        except UsageError:  # the agent asked for a third step: it did not accept the teacher's two
            report.drop("agent_rejected_teacher")
            continue
        top = shown.top_docs[0] if shown.top_docs else ""
        if not (t.finished and len(t.steps) == 2 and all(step_action_valid(s) for s in t.steps)):
            report.drop("agent_rejected_teacher")  # e.g. the search failed; never expected
            continue
        if cfg.require_evidence_shown and c.label != NEI and top not in c.evidence_docs:
            report.drop("evidence_not_shown")
            continue
        t.policy = f"teacher:{policy.name}"
        t.feedback = Feedback(correct=True, gold=c.label)
        t.meta.update({"source": "scifact-teacher", "claim_id": c.id, "shown_doc": top,
                       "evidence_docs": list(c.evidence_docs)})
        out.append(t)
        report.kept += 1
    return out


# --------------------------------------------------------------------------------------------- loop


def _clock(kind: str) -> tuple[Callable[[], float], float]:
    now = make_clock(kind)
    return now, now()


def evaluate_claims(policy: Any, retriever: Any, examples: Sequence[Any], cfg: ReactImproveConfig, out: Path,
                    tag: str, now: Callable[[], float]) -> tuple[dict[str, Any], list[Trace]]:
    """The claims agent on ``examples``; the runner's report plus the valid-action rates."""
    from ragloop.agents.factory import build_agent
    from ragloop.eval.runners import run_examples

    c0 = now()
    spec = cfg.agent_spec()
    traces, seconds = run_examples(lambda: build_agent(policy, spec, retriever=retriever), examples, task="claims",
                                   out=out / "traces" / f"eval-{tag}.jsonl")
    return eval_summary(traces, cfg, policy_name=policy.name, seconds=seconds, budget_seconds=now() - c0), traces


def eval_summary(traces: Sequence[Trace], cfg: ReactImproveConfig, *, policy_name: str, seconds: float,
                 budget_seconds: float | None) -> dict[str, Any]:
    """Scored claim traces → the figures of one side of the table."""
    from ragloop.eval.runners import summarize

    rep = summarize(traces, task="claims", agent="react", model=policy_name, data=cfg.claims_file,
                    slice_=f"claims_train.csv[0:{len(traces)}]", seed=cfg.seed, seconds=seconds).to_dict()
    keep = ("n", "correct", "accuracy", "ci95", "format_valid", "format_valid_strict", "finished",
            "tool_success", "predictions", "by_gold", "tokens_out_per_question", "seconds_per_question")
    s = {k: rep[k] for k in keep}
    s.update(action_metrics(traces))
    s.update({"policy": policy_name, "seconds": round(seconds, 1), "budget_seconds": None if budget_seconds is None else round(budget_seconds, 1),
              "tokens_out": sum(t.tokens_out for t in traces)})
    return s


def run_improve_react(cfg: ReactImproveConfig, *, policy: Any = None, retriever: Any = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the loop; returns the summary (also ``<out>/summary.json``). ``policy`` / ``retriever`` may be
    passed in (tests: the tiny model and a small hashing-embedder index); else ``cfg.policy`` / ``cfg.index``."""
    from ragloop.alignment.improve import _general_rows, default_data_dir
    from ragloop.alignment.sft import SFTConfig, run_sft
    from ragloop.eval.runners import load_claims

    now, t_start = _clock(cfg.budget_clock)
    budget = cfg.budget_minutes * 60.0
    wall0 = time.perf_counter()
    say = progress or (lambda msg: log.info(msg))
    out = Path(cfg.out_dir)
    data = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    claims_path = data / cfg.claims_file
    if retriever is None:  # before loading the model: a wrong --index fails fast
        from ragloop.eval.runners import ensure_scifact_index

        retriever = ensure_scifact_index(cfg.index, None)
    examples = load_claims(claims_path, limit=cfg.eval_n)
    if len(examples) < cfg.eval_n:
        raise UsageError(f"--eval-n {cfg.eval_n} is more than the {len(examples)} claims of {claims_path}")
    (out / "traces").mkdir(parents=True, exist_ok=True)
    if policy is None:
        from ragloop.models.loading import load_policy

        policy = load_policy(cfg.policy)
    start_name = policy.name
    stages: dict[str, Any] = {}

    # 1. before ------------------------------------------------------------------------------------------
    before, _ = evaluate_claims(policy, retriever, examples, cfg, out, "before", now)
    say(f"eval (before): {before['correct']}/{before['n']} correct, valid actions "
        f"{100 * before['valid_action_rate']:.1f}% of {before['model_steps']} steps, valid finish "
        f"{100 * before['valid_finish_rate']:.1f}%, {before['seconds']:.0f} s")

    # 2. teacher traces on other claims --------------------------------------------------------------------
    c0 = now()
    held_out = {e.id for e in examples}
    crep, trep = DropReport(), DropReport()
    pool = read_teacher_claims(claims_path, crep, exclude=held_out)
    crep.kept = len(pool)
    random.Random(cfg.seed).shuffle(pool)
    teach = build_teacher_traces(policy, retriever, pool[: cfg.teacher_n], cfg, trep)
    write_traces(out / "traces" / "teacher.jsonl", teach)
    rows, mrep = traces_to_sft_rows(teach)
    rows = [r.model_copy(update={"source": "scifact-teacher"}) for r in rows]
    labels = {k: sum(1 for t in teach if t.feedback.gold == k) for k in ("SUPPORT", "CONTRADICT", NEI)}
    stages["teacher"] = {"claims": crep.to_dict(), "traces": trep.to_dict(), "labels": labels,
                         "sft_rows": mrep.to_dict(), "seconds": round(now() - c0, 1)}
    say(f"teacher: {len(teach)} traces from {trep.read} claims ({trep.summary()}); claims file: {crep.summary()}")
    if not rows:
        raise DataError("no teacher trace survived", hint=f"teacher report: {trep.summary()}")

    # 3. SFT within the budget, the after-evaluation reserved ------------------------------------------------
    teach_tokens = sum(t.tokens_out for t in teach) / len(teach)
    per_token = before["budget_seconds"] / max(1, before["tokens_out"])
    after_guess = min(before["budget_seconds"],
                      max(0.3 * before["budget_seconds"], 1.5 * per_token * teach_tokens * len(examples)))
    sft_budget = max(cfg.min_sft_seconds, budget - (now() - t_start) - after_guess - cfg.reserve_seconds)
    general = _general_rows(data, cfg.general_n)
    say(f"SFT on {len(rows)} rows, budget {sft_budget / 60:.1f} min (after-eval reserved {after_guess / 60:.1f} min)")
    sft_cfg = SFTConfig(out_dir=str(out / "sft"), method=cfg.sft_method, lr=cfg.sft_lr,  # type: ignore[arg-type]
                        batch_size=cfg.sft_batch, grad_accum=cfg.sft_grad_accum, max_length=cfg.sft_max_length, bf16=_sft_bf16(cfg.sft_bf16), seed=cfg.seed,
                        budget_seconds=sft_budget, save_every=25, warmup_steps=3, name=f"{start_name}-scifact-react",
                        epochs=cfg.sft_epochs, budget_clock=cfg.budget_clock)
    res = run_sft(sft_cfg, policy, rows, general_rows=general)
    gc.collect()  # the training step's activations and optimizer state are garbage now
    policy.name = f"{start_name}-scifact-react"
    stages["sft"] = {"steps": res.steps, "final_loss": res.final_loss, "stopped_by": res.stopped_by,
                     "rows": len(rows), "rows_seen": min(len(rows), res.steps * cfg.sft_batch * cfg.sft_grad_accum),
                     "tokens_per_s": res.tokens_per_second, "budget_s": round(sft_budget, 1),
                     "general_nll_before": res.general_nll_before, "general_nll_after": res.general_nll_after,
                     "data": res.data_report}

    # 4. after --------------------------------------------------------------------------------------------
    after, _ = evaluate_claims(policy, retriever, examples, cfg, out, "after", now)
    stages["after_eval_reserved_s"] = round(after_guess, 1)
    say(f"eval (after): {after['correct']}/{after['n']} correct, valid actions "
        f"{100 * after['valid_action_rate']:.1f}% of {after['model_steps']} steps, valid finish "
        f"{100 * after['valid_finish_rate']:.1f}%, {after['seconds']:.0f} s")
    ckpt = str(res.policy_dir) if res.policy_dir else None
    return write_summary(cfg, before, after, stages, ckpt=ckpt, start_name=start_name,
                         index=str(getattr(retriever, "path", cfg.index)),
                         elapsed_minutes=(now() - t_start) / 60, wall_minutes=(time.perf_counter() - wall0) / 60)


def write_summary(cfg: ReactImproveConfig, before: dict[str, Any], after: dict[str, Any], stages: dict[str, Any], *,
                  ckpt: str | None, start_name: str, index: str, elapsed_minutes: float,
                  wall_minutes: float) -> dict[str, Any]:
    """``summary.json`` and ``table.md`` in ``cfg.out_dir``; returns the summary."""
    out = Path(cfg.out_dir)
    n = before["n"]
    summary = {
        "task": "scifact-react", "slice": f"{cfg.claims_file} claims 0-{n - 1} (first {n})", "index": index,
        "definitions": {
            "valid_action_rate": "per step: fraction of the model's ReAct steps whose Action line parses strictly "
                                 "(no parser repair, no re-ask) as Search/Lookup/Finish with a non-empty argument",
            "valid_finish_rate": "per trace: fraction of claims whose run ended with a strictly valid Finish step",
            "format_valid_strict": "valid finish and no step failed to parse or needed a repair",
        },
        "prompt_settings": {"shots": cfg.shots, "max_steps": cfg.max_steps, "max_new_tokens": cfg.max_new_tokens,
                            "prompt_style": cfg.prompt_style, "fallback": cfg.fallback, "decoding": "greedy"},
        "before": before, "after": after, "policy": ckpt, "start_policy": start_name,
        "eval_command": cfg.eval_command(ckpt or "<policy>"),
        "budget_minutes": cfg.budget_minutes, "budget_clock": cfg.budget_clock,
        "elapsed_minutes": round(elapsed_minutes, 2), "wall_minutes": round(wall_minutes, 2), "stages": stages,
        "config": asdict(cfg),
    }
    table = react_table(before, after)
    summary["table"] = table
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    return summary


def finish_after_sft(cfg: ReactImproveConfig, *, policy: Any = None, retriever: Any = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Finish a loop that stopped after its SFT stage (e.g. killed for memory during the after-evaluation):
    re-score the saved before traces, evaluate the exported policy ``<out>/sft/policy`` on the same slice in
    this process, and write the summary (``stages.finished_after_sft`` says so). The budget figures then
    cover only this finishing run."""
    from ragloop.alignment.improve import default_data_dir
    from ragloop.core.trace import read_traces
    from ragloop.eval.runners import load_claims, normalize_label

    out = Path(cfg.out_dir)
    now, t_start = _clock(cfg.budget_clock)
    wall0 = time.perf_counter()
    say = progress or (lambda msg: log.info(msg))
    before_path, ckpt = out / "traces" / "eval-before.jsonl", out / "sft" / "policy"
    if not before_path.is_file() or not (ckpt / "ragloop.json").is_file():
        raise DataError(f"{out} holds no finished SFT stage (need {before_path} and {ckpt})",
                        hint="run the whole loop: ragloop improve --task scifact-react --out DIR")
    before_traces = read_traces(before_path)
    if len(before_traces) != cfg.eval_n:
        raise DataError(f"{before_path} holds {len(before_traces)} traces, not eval_n={cfg.eval_n}")
    examples = load_claims((Path(cfg.data_dir) if cfg.data_dir else default_data_dir()) / cfg.claims_file,
                           limit=cfg.eval_n)
    if [e.id for e in examples] != [t.meta.get("example_id") for t in before_traces]:
        raise DataError(f"{before_path} is not the first {cfg.eval_n} claims of {cfg.claims_file}")
    for t, e in zip(before_traces, examples, strict=True):  # scored again, as the runner scores
        t.feedback.correct = normalize_label(t.answer) == e.gold
    start_name = before_traces[0].policy
    before = eval_summary(before_traces, cfg, policy_name=start_name,
                          seconds=sum(t.seconds for t in before_traces), budget_seconds=None)
    if retriever is None:
        from ragloop.eval.runners import ensure_scifact_index

        retriever = ensure_scifact_index(cfg.index, None)
    if policy is None:
        from ragloop.models.loading import load_policy

        policy = load_policy(str(ckpt))
    after, _ = evaluate_claims(policy, retriever, examples, cfg, out, "after", now)
    say(f"eval (after, {ckpt}): {after['correct']}/{after['n']} correct, valid actions "
        f"{100 * after['valid_action_rate']:.1f}% of {after['model_steps']} steps")
    stages: dict[str, Any] = {"finished_after_sft": {"policy": str(ckpt), "before": "re-scored from saved traces"}}
    teacher_path = out / "traces" / "teacher.jsonl"
    if teacher_path.is_file():
        teach = read_traces(teacher_path)
        stages["teacher"] = {"traces": len(teach), "labels": {k: sum(1 for t in teach if t.feedback.gold == k)
                                                               for k in ("SUPPORT", "CONTRADICT", NEI)}}
    metrics = out / "sft" / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
        last = lines[-1] if lines else {}
        stages["sft"] = {"steps": last.get("step"), "final_loss": last.get("loss"), "policy": str(ckpt)}
    return write_summary(cfg, before, after, stages, ckpt=str(ckpt), start_name=start_name,
                         index=str(getattr(retriever, "path", cfg.index)),
                         elapsed_minutes=(now() - t_start) / 60, wall_minutes=(time.perf_counter() - wall0) / 60)


def react_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The before/after table (markdown), with the metric definitions under it."""
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    rows = [
        ("valid-action rate (per step)", f"{pct(before['valid_action_rate'])} ({before['valid_steps']}/{before['model_steps']})",
         f"{pct(after['valid_action_rate'])} ({after['valid_steps']}/{after['model_steps']})"),
        ("valid finish (per trace)", f"{pct(before['valid_finish_rate'])} ({before['valid_finishes']}/{before['n']})",
         f"{pct(after['valid_finish_rate'])} ({after['valid_finishes']}/{after['n']})"),
        ("format valid, strict", pct(before["format_valid_strict"]), pct(after["format_valid_strict"])),
        ("format valid (repairs allowed)", pct(before["format_valid"]), pct(after["format_valid"])),
        ("accuracy", f"{pct(before['accuracy'])} ({before['correct']}/{before['n']})",
         f"{pct(after['accuracy'])} ({after['correct']}/{after['n']})"),
        ("95% CI (Wilson)", f"[{pct(before['ci95'][0])}, {pct(before['ci95'][1])}]",
         f"[{pct(after['ci95'][0])}, {pct(after['ci95'][1])}]"),
        ("mean steps", f"{before['mean_steps']:.2f}", f"{after['mean_steps']:.2f}"),
        ("tokens out / claim", f"{before['tokens_out_per_question']:.1f}", f"{after['tokens_out_per_question']:.1f}"),
        ("seconds", f"{before['seconds']:.0f}", f"{after['seconds']:.0f}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'metric':<{w}} | before | after |", f"|{'-' * (w + 2)}|--------|-------|"]
    lines += [f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "Valid-action rate: over the ReAct steps the model generated, the fraction whose Action line "
              "parses strictly (no parser repair, no re-ask) as Search/Lookup/Finish with a non-empty argument. "
              "Valid finish: the run ended with such a Finish step."]
    return "\n".join(lines)


def _sft_bf16(setting: bool | None) -> bool:
    """bf16 autocast for SFT: as set, or (None) where the CPU does bf16 natively — emulated bf16 on AVX2 is
    slower than fp32 (benchmarks/RESULTS.md, "Decoding on every CPU")."""
    from ragloop.models.cpu import autocast_bf16

    return autocast_bf16() if setting is None else setting
