"""Benchmark runners: GSM8K (PAL, CoT, ReAct with a calculator) and SciFact claim verification (ReAct over a
local index of the SciFact corpus).

- GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): ``{"question", "answer"}``
  rows, gold = the number after the last ``####``; a prediction is correct when its number matches.
- SciFact (Wadden et al. 2020, "Fact or Fiction: Verifying Scientific Claims"): ``claims_train.csv`` rows,
  one claim per ``id`` (the first row of an id is used); labels SUPPORT / CONTRADICT / empty map to the
  FEVER labels the ReAct prompts use: SUPPORTS / REFUTES / NOT ENOUGH INFO.

Each run is deterministic (greedy decoding, a fixed seed recorded in every Trace), writes one Trace per
example (JSONL, appended as it goes, so a long run can be watched), and returns an ``EvalReport``:
accuracy with a 95% Wilson interval, format validity (strict = without parser repairs), tool success,
fallback rate, seconds per question, the slice, seed and model — and, for claims answered from the index
(``rag``, ``react``), groundedness: the share of answers whose content words are in the passages they cite
or retrieved (K-Precision, ``ragloop.eval.groundedness``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ragloop.core.errors import DataError, UsageError
from ragloop.core.trace import Trace, write_traces
from ragloop.eval.groundedness import summarize_groundedness
from ragloop.eval.metrics import extract_number, numeric_match
from ragloop.eval.stats import wilson_ci

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, Trace], None]

PARSE_ERRORS = {"no-action", "bad-action", "no-program", "no-answer"}
CLAIM_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
_SCIFACT_TO_FEVER = {"SUPPORT": "SUPPORTS", "CONTRADICT": "REFUTES", "": "NOT ENOUGH INFO"}


@dataclass(frozen=True)
class Example:
    """One benchmark item: the input text, the gold answer, and where it came from."""

    id: str
    question: str
    gold: str


# ------------------------------------------------------------------------------------------ data
def _check_slice(limit: int | None, offset: int) -> None:
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if offset < 0:
        raise UsageError(f"--offset must be >= 0, got {offset}")


def _decode_line(raw: bytes, path: Path, lineno: int, expected: str) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)",
                        hint=f"--data must be {expected}") from None


def load_gsm8k(path: str | Path, *, limit: int | None = None, offset: int = 0) -> list[Example]:
    """GSM8K rows ``offset .. offset+limit`` of a JSONL file; a bad row is a DataError naming its line."""
    _check_slice(limit, offset)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"GSM8K data file not found: {p}", hint="pass --data path/to/test_dev300.jsonl")
    out: list[Example] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, p, lineno, "a GSM8K JSONL file (test_dev300.jsonl)")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                q, a = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{p}:{lineno}: expected a JSON object with 'question' and 'answer'") from None
            if "####" not in a or extract_number(a) is None:
                raise DataError(f"{p}:{lineno}: the answer has no '#### <number>' gold")
            out.append(Example(f"{p.stem}:{lineno}", q.strip(), a.rsplit("####", 1)[1].strip()))
    if not out:
        raise DataError(f"{p}: no rows")
    sel = out[offset : offset + limit if limit else None]
    if not sel:
        raise UsageError(f"--offset {offset} is past the end of {p} ({len(out)} rows)")
    return sel


def load_claims(path: str | Path, *, limit: int | None = None, offset: int = 0) -> list[Example]:
    """SciFact claims (one per id, first row), gold in FEVER labels."""
    _check_slice(limit, offset)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"claims file not found: {p}", hint="pass --data path/to/claims_train.csv")
    seen: dict[str, Example] = {}
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start + 1})",
                        hint="--data must be the SciFact claims CSV (claims_train.csv)") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        need = {"id", "claim", "evidence_label"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise DataError(f"{p}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            label = (row["evidence_label"] or "").strip().upper()
            if label not in _SCIFACT_TO_FEVER:
                raise DataError(f"{p}:{lineno}: unknown evidence_label {row['evidence_label']!r}")
            if row["id"] not in seen and row["claim"].strip():
                seen[row["id"]] = Example(row["id"], row["claim"].strip(), _SCIFACT_TO_FEVER[label])
    rows = list(seen.values())
    if not rows:
        raise DataError(f"{p}: no claims")
    sel = rows[offset : offset + limit if limit else None]
    if not sel:
        raise UsageError(f"--offset {offset} is past the end of {p} ({len(rows)} claims)")
    return sel


# --------------------------------------------------------------------------------------- scoring
def normalize_label(answer: str | None) -> str | None:
    """A claim label from free text: ``normalize_label("Supported.") -> "SUPPORTS"``; None if unclear."""
    if not answer:
        return None
    a = " ".join(answer.upper().replace("_", " ").split()).strip(" .!\"'")
    if a.startswith(("NOT ENOUGH", "NEI", "NO EVIDENCE", "INSUFFICIENT", "UNKNOWN")):
        return "NOT ENOUGH INFO"
    if a.startswith(("SUPPORT", "TRUE", "YES")):
        return "SUPPORTS"
    if a.startswith(("REFUTE", "CONTRADICT", "FALSE", "NO")):
        return "REFUTES"
    return None


def is_correct(task: str, answer: str | None, gold: str) -> bool:
    if task == "gsm8k":
        return answer is not None and numeric_match(answer, gold) == 1.0
    return normalize_label(answer) == gold


def trace_format_valid(trace: Trace, *, strict: bool = False) -> bool:
    """Did the model produce its answer in the agent's own format? ``strict``: without parser repairs.

    ReAct: finished by its own Finish and no step failed to parse. PAL: a program was extracted and
    parsed (it may still fail at run time). CoT: the answer pattern was found.
    """
    if trace.agent == "react":
        ok = trace.finished and not any(s.error_type in PARSE_ERRORS for s in trace.steps)
    elif trace.agent == "pal":
        ok = bool(trace.steps) and all(s.code is not None and s.error_type != "validation" for s in trace.steps)
    else:
        ok = trace.finished
    if ok and strict:
        ok = not any(s.repairs for s in trace.steps)
    return ok


def tool_calls_of(trace: Trace) -> list[bool]:
    """Success of each tool execution in a trace (ReAct actions except Finish; PAL program runs)."""
    if trace.agent == "react":
        return [s.error is None for s in trace.steps if s.action is not None and s.action.name != "Finish"]
    if trace.agent == "pal":
        return [s.error is None for s in trace.steps if s.code is not None]
    return []


@dataclass
class EvalReport:
    """What a benchmark run measured (``to_dict`` is the runner's ``--json`` line)."""

    task: str
    agent: str
    model: str
    data: str
    slice: str
    seed: int
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    format_valid: float
    format_valid_strict: float
    tool_success: float | None
    tool_calls: int
    finished: float
    fallback_rate: float
    seconds_per_question: float
    tokens_out_per_question: float
    traces: str | None = None
    by_gold: dict[str, dict[str, int]] = field(default_factory=dict)
    predictions: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    groundedness: dict[str, Any] | None = None  # retrieval tasks only (see ragloop.eval.groundedness)
    selection: dict[str, Any] | None = None  # --samples N > 1: how the answer was chosen (run_sampled_examples)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci95"] = [round(self.ci95[0], 4), round(self.ci95[1], 4)]
        for k in ("accuracy", "format_valid", "format_valid_strict", "finished", "fallback_rate"):
            d[k] = round(d[k], 4)
        if self.tool_success is not None:
            d["tool_success"] = round(self.tool_success, 4)
        d["seconds_per_question"] = round(self.seconds_per_question, 2)
        d["tokens_out_per_question"] = round(self.tokens_out_per_question, 1)
        return d


def summarize(traces: Sequence[Trace], *, task: str, agent: str, model: str, data: str, slice_: str, seed: int,
              seconds: float, out: str | None = None, settings: dict[str, Any] | None = None) -> EvalReport:
    """An EvalReport from scored traces (``trace.feedback.correct`` / ``.gold`` set)."""
    n = len(traces)
    k = sum(1 for t in traces if t.feedback.correct)
    calls = [ok for t in traces for ok in tool_calls_of(t)]
    by_gold: dict[str, dict[str, int]] = {}
    preds: Counter[str] = Counter()
    for t in traces:
        g = t.feedback.gold or ""
        d = by_gold.setdefault(g, {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += int(bool(t.feedback.correct))
        if task == "claims":
            preds[normalize_label(t.answer) or "(none)"] += 1
    div = max(n, 1)
    return EvalReport(
        task=task, agent=agent, model=model, data=data, slice=slice_, seed=seed, n=n, correct=k,
        accuracy=k / div, ci95=wilson_ci(k, n),
        format_valid=sum(trace_format_valid(t) for t in traces) / div,
        format_valid_strict=sum(trace_format_valid(t, strict=True) for t in traces) / div,
        tool_success=(sum(calls) / len(calls)) if calls else None, tool_calls=len(calls),
        finished=sum(t.finished for t in traces) / div,
        fallback_rate=sum(t.fallback is not None for t in traces) / div,
        seconds_per_question=seconds / div,
        tokens_out_per_question=sum(t.tokens_out for t in traces) / div,
        traces=out, by_gold=by_gold if task == "claims" else {}, predictions=dict(preds),
        settings=dict(settings or {}),
        groundedness=summarize_groundedness(traces) if task == "claims" and agent in ("rag", "react") else None,
    )


# ---------------------------------------------------------------------------------------- running
def run_examples(
    agent: Any,
    examples: Sequence[Example],
    *,
    task: Literal["gsm8k", "claims"],
    out: str | Path | None = None,
    progress: ProgressFn | None = None,
    batch_size: int | None = None,
) -> tuple[list[Trace], float]:
    """Run the agent on every example as episodes stepped together (``ragloop.agents.runtime``), scoring
    each Trace and (optionally) appending it to ``out`` as it finishes; returns them in input order.

    ``agent`` is an agent or a zero-argument factory of agents. A factory gives every episode its own agent
    (ReAct's tools keep per-run state); one agent instance is shared only when it declares
    ``concurrent_safe`` and otherwise runs one episode at a time. ``batch_size``: episodes in flight
    (default ``ragloop.agents.runtime.default_batch_size()``).
    """
    from ragloop.agents.runtime import run_questions

    if callable(agent) and not hasattr(agent, "episode"):
        make = agent
    else:
        make = lambda: agent  # noqa: E731
        if not getattr(agent, "concurrent_safe", False):
            batch_size = 1
    if out is not None:
        write_traces(out, [])  # start a fresh file (atomically), then append one line per example
    t0 = time.perf_counter()
    done = 0

    def finished(i: int, trace: Trace) -> None:
        nonlocal done
        ex = examples[i]
        trace.feedback.gold = ex.gold
        trace.feedback.correct = is_correct(task, trace.answer, ex.gold)
        trace.meta["example_id"] = ex.id
        if out is not None:
            write_traces(out, [trace], append=True)
        done += 1
        if progress is not None:
            progress(done, len(examples), trace)

    traces = run_questions(make, [ex.question for ex in examples], _policy_of(make), task=task,
                           batch_size=batch_size, on_done=finished)
    if out is not None:
        write_traces(out, traces)  # the finished file in input order (appended above in finishing order)
    return traces, time.perf_counter() - t0


def _policy_of(make: Callable[[], Any]) -> Any:
    agent = make()
    policy = getattr(agent, "policy", None)
    if policy is None:
        raise UsageError(f"{type(agent).__name__} has no policy to run episodes with")
    return policy


@dataclass
class RunConfig:
    """A benchmark run: which task, data slice, agent settings and where the traces go."""

    task: Literal["gsm8k", "claims"]
    agent: Literal["pal", "cot", "react", "rag"]
    data: str
    limit: int | None = None
    offset: int = 0
    seed: int = 0
    out: str | None = None
    shots: int | None = None
    self_consistency: int = 1
    max_new_tokens: int | None = None
    max_steps: int | None = None
    prompt_style: str | None = None
    action_format: Literal["text", "json"] = "text"
    fallback: Literal["cot-sc", "none"] = "cot-sc"
    batch_size: int | None = None  # episodes decoded together (None: the runtime's default)
    extra_settings: dict[str, Any] = field(default_factory=dict)
    constrained: bool = False  # grammar-constrained decoding (ragloop.models.grammar)
    samples: int = 1  # > 1: whole runs per question, sampled at `temperature`, one chosen by `select`
    select: str = "majority"  # majority | verifier | majority+verifier (ragloop.eval.select)
    temperature: float | None = None  # sampling temperature of the samples (None: 0.7)


def run_benchmark(
    cfg: RunConfig,
    policy: Any,
    *,
    retriever: Any = None,
    sandbox: Any = None,
    progress: ProgressFn | None = None,
    verifier: Any = None,
) -> EvalReport:
    """Load the slice, build the agent (``ragloop.agents.factory``), run, score, summarise. With
    ``cfg.samples > 1`` every question is run that many times (sampled) and one run is chosen per question
    by ``cfg.select`` (``verifier``: a ``ragloop.eval.select.Verifier`` for the verifier methods)."""
    from ragloop.agents.factory import AgentSpec, build_agent
    from ragloop.agents.runtime import default_batch_size

    if cfg.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {cfg.samples}")
    if cfg.temperature is not None and cfg.samples == 1:
        raise UsageError("--temperature sets the sampling of --samples runs; a single run is greedy",
                         hint="add --samples N (N >= 2) or drop --temperature")
    if cfg.task == "gsm8k":
        examples = load_gsm8k(cfg.data, limit=cfg.limit, offset=cfg.offset)
        family = "math"
    elif cfg.task == "claims":
        if cfg.agent == "pal":
            raise UsageError("PAL answers math questions; use --agent rag, react or cot for claims")
        examples = load_claims(cfg.data, limit=cfg.limit, offset=cfg.offset)
        family = "claims"
    else:
        raise UsageError(f"unknown benchmark {cfg.task!r}; choose gsm8k or claims")
    spec = AgentSpec(kind=cfg.agent, task=family, shots=cfg.shots, self_consistency=cfg.self_consistency,  # type: ignore[arg-type]
                     max_new_tokens=cfg.max_new_tokens, max_steps=cfg.max_steps, prompt_style=cfg.prompt_style,
                     action_format=cfg.action_format, seed=cfg.seed, fallback=cfg.fallback,
                     constrained=cfg.constrained)
    agent = build_agent(policy, spec, retriever=retriever, sandbox=sandbox)

    def make_agent() -> Any:  # one agent per episode: tools keep per-run state
        return build_agent(policy, spec, retriever=retriever, sandbox=sandbox)

    selection = None
    if cfg.samples > 1:
        import dataclasses

        temp = cfg.temperature or 0.7
        sample_specs = [dataclasses.replace(spec, temperature=temp, seed=cfg.seed + j) for j in range(cfg.samples)]
        traces, seconds, selection = run_sampled_examples(
            lambda j: build_agent(policy, sample_specs[j], retriever=retriever, sandbox=sandbox), examples,
            task=cfg.task, samples=cfg.samples, select=cfg.select, verifier=verifier, out=cfg.out,
            progress=progress, batch_size=cfg.batch_size)
        selection["temperature"] = temp
    else:
        traces, seconds = run_examples(make_agent, examples, task=cfg.task, out=cfg.out, progress=progress,
                                       batch_size=cfg.batch_size or default_batch_size(cfg.agent))
    end = cfg.offset + len(examples)
    settings = {**effective_settings(agent), **cfg.extra_settings}
    settings["batch_size"] = cfg.batch_size or default_batch_size(cfg.agent if cfg.samples == 1 else None)
    if getattr(policy, "precision", None):  # the decode weights (fp32 unless a reduced precision was asked for)
        settings["precision"] = policy.precision
    report = summarize(traces, task=cfg.task, agent=cfg.agent, model=getattr(policy, "name", "?"),
                       data=str(cfg.data), slice_=f"{Path(cfg.data).name}[{cfg.offset}:{end}]", seed=cfg.seed,
                       seconds=seconds, out=cfg.out, settings=settings)
    report.selection = selection
    return report


def samples_path(out: str | Path) -> Path:
    """Where every sampled run goes next to the chosen ones: ``run.jsonl`` -> ``run.samples.jsonl``."""
    p = Path(out)
    return p.with_name(p.stem + ".samples" + (p.suffix or ".jsonl"))


def run_sampled_examples(
    make_agent: Callable[[int], Any],
    examples: Sequence[Example],
    *,
    task: Literal["gsm8k", "claims"],
    samples: int,
    select: str = "majority",
    verifier: Any = None,
    out: str | Path | None = None,
    progress: ProgressFn | None = None,
    batch_size: int | None = None,
) -> tuple[list[Trace], float, dict[str, Any]]:
    """Run every example ``samples`` times — all questions × samples as one set of episodes on the runtime —
    score every run, and choose one run per question with ``ragloop.eval.select`` (``make_agent(j)`` builds
    the agent of sample ``j``, e.g. with seed SEED+j). Returns the chosen traces (input order; each with
    ``meta["selection"]``), the seconds, and the selection summary for the report: the method, the accuracy
    of a single sample, pass@N (a question with at least one correct sample: what a perfect selector gets),
    and — with a verifier — the accuracy every method reaches on these same samples (``by_method``).
    ``out`` gets the chosen traces, ``samples_path(out)`` every run (judged: the input of
    ``ragloop train verifier``)."""
    from ragloop.agents.runtime import Episode, run_episodes
    from ragloop.eval.select import check_method, compare_methods

    check_method(select, verifier)
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if out is not None:
        write_traces(out, [])
        write_traces(samples_path(out), [])
    t0 = time.perf_counter()
    eps = [Episode(make_agent(j).episode(ex.question, task=task)) for ex in examples for j in range(samples)]
    groups: list[list[Trace | None]] = [[None] * samples for _ in examples]
    chosen: list[Trace | None] = [None] * len(examples)
    method_correct: Counter[str] = Counter()
    done = 0

    def finished(k: int, trace: Trace) -> None:
        nonlocal done
        i, j = divmod(k, samples)
        ex = examples[i]
        trace.feedback.gold = ex.gold
        trace.feedback.correct = is_correct(task, trace.answer, ex.gold)
        trace.meta["example_id"] = ex.id
        trace.meta["sample"] = j
        if out is not None:
            write_traces(samples_path(out), [trace], append=True)
        groups[i][j] = trace
        if any(t is None for t in groups[i]):
            return
        runs: list[Trace] = groups[i]  # type: ignore[assignment]
        scores = verifier.score(ex.question, runs) if verifier is not None else None
        sels = compare_methods([t.answer for t in runs], task=task, scores=scores,
                               verifier_name=getattr(verifier, "name", None))
        for m, s in sels.items():
            method_correct[m] += int(bool(runs[s.index].feedback.correct))
        sel = sels[select]
        pick = runs[sel.index].model_copy(deep=True)
        pick.meta["selection"] = {**sel.to_meta(), "n": samples,
                                  "correct_samples": sum(bool(t.feedback.correct) for t in runs)}
        chosen[i] = pick
        if out is not None:
            write_traces(out, [pick], append=True)
        done += 1
        if progress is not None:
            progress(done, len(examples), pick)

    all_runs = run_episodes(_policy_of(lambda: make_agent(0)), eps, batch_size=batch_size, on_done=finished)
    picked: list[Trace] = [t for t in chosen if t is not None]
    if out is not None:
        write_traces(samples_path(out), all_runs)
        write_traces(out, picked)
    n = len(examples)
    summary: dict[str, Any] = {
        "method": select, "samples": samples, "verifier": getattr(verifier, "name", None),
        "sample_accuracy": round(sum(bool(t.feedback.correct) for t in all_runs) / max(len(all_runs), 1), 4),
        "pass_at_n": round(sum(t.meta["selection"]["correct_samples"] > 0 for t in picked) / max(n, 1), 4),
        "by_method": {m: {"correct": c, "n": n, "accuracy": round(c / max(n, 1), 4),
                          "ci95": [round(x, 4) for x in wilson_ci(c, n)]}
                      for m, c in sorted(method_correct.items())},
        "samples_file": str(samples_path(out)) if out is not None else None,
    }
    return picked, time.perf_counter() - t0, summary


def effective_settings(agent: Any) -> dict[str, Any]:
    """The agent's resolved configuration as JSON-friendly values (objects such as exemplar lists and
    embedders are summarised), recorded with every report."""
    out: dict[str, Any] = {"agent_class": type(agent).__name__}
    conf = getattr(agent, "config", None)
    for k, v in (vars(conf) if conf is not None else {}).items():
        if k == "exemplars":
            out["exemplar_pool"] = "default" if v is None else len(v)
        elif k == "decoding":
            out["decoding"] = None if v is None else {kk: vv for kk, vv in v.to_dict().items() if kk != "stop"}
        elif k == "format":
            out["format"] = getattr(v, "question_prefix", str(v)).strip()
        elif k == "embedder":
            out["embedder"] = None if v is None else type(v).__name__
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    fb = getattr(agent, "_fallback_agent", None)
    if fb is not None:
        out["fallback_shots"] = fb.config.shots
    return out


def ensure_scifact_index(index: str, corpus: str | Path | None, *, progress: Callable[[str], None] | None = None) -> Any:
    """Open ``index`` (a path or a name under ``~/.ragloop/indexes``); with ``corpus`` build it first when
    it does not exist yet. Returns a ``Retriever``."""
    from ragloop.retrieval import Retriever, index_documents, read_beir_corpus, resolve_index_path
    from ragloop.retrieval.store import read_pointer

    root = resolve_index_path(index)
    if corpus is not None and read_pointer(root) is None:
        if progress:
            progress(f"building the index {root} from {corpus} (once)")
        index_documents(read_beir_corpus(corpus), str(root))
    return Retriever.open(str(root))
