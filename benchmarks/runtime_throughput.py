"""Agent evaluation throughput: episodes stepped together on the decode engine vs one question at a time.

Same model (the embedded SmolLM2-135M-Instruct), same agent settings, same questions, same process:

- baseline: today's one-at-a-time runner — ``agent.run(question)`` for each question in turn (the runtime
  with one episode, i.e. ``ragloop eval --batch-size 1``), on the first ``--baseline-n`` questions;
- runtime: ``run_questions`` with ``--batch-size`` episodes in flight, on all ``--n`` questions (the first
  ``--baseline-n`` included, so the greedy traces can be compared one by one).

Throughput is questions per second (wall) and per CPU-second (this process's CPU time: decode, parsing,
tools; the sandbox's child processes are not counted). The ratio is runtime / baseline. The baseline runs
on fewer questions because one at a time it costs ~10-30 s each: its per-question time is the mean over
``--baseline-n`` questions, stated in the JSON. ``identical`` is the share of the common questions whose
trace (steps, answer) is the same both ways (greedy decoding: it should be 1.0).

Tasks: ``--agent pal|cot`` on GSM8K ``test_dev300.jsonl``; ``--agent react`` on GSM8K with a calculator
(``--task gsm8k``) or on SciFact claims (``--task claims``) over an index of the claims' cited abstracts plus
``--distractors`` others, built in a temp dir (``--index`` to reuse one).

Precision: both sides decode in ``--precision`` (the same function: the ratio is the runtime's alone); with
``--baseline-precision fp32 --precision auto`` the baseline is the runner as it was before ``auto`` became the
default, so the ratio is what a user of ``ragloop eval`` gains from both changes together (``identical`` then
compares traces across precisions and need not be 1).

Run: ``.venv/bin/python benchmarks/runtime_throughput.py --agent pal --n 64 --baseline-n 8``. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"


def build_claims_index(examples, distractors: int, out: Path) -> str:
    """An index of the SciFact abstracts the claims cite, plus ``distractors`` other abstracts."""
    import csv

    from ragloop.retrieval import index_documents, read_beir_corpus

    cited: set[str] = set()
    ids = {e.id.split(":")[-1] for e in examples}
    with (DATA / "scifact" / "claims_train.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["id"] in ids:
                cited.update(x.strip() for x in row["cited_doc_ids"].strip("[]").split(",") if x.strip())
    docs = list(read_beir_corpus(DATA / "scifact" / "corpus.jsonl"))
    keep = [d for d in docs if d.doc_id in cited]
    others = [d for d in docs if d.doc_id not in cited][:distractors]
    index_documents(keep + others, str(out))
    return str(out)


def add_args(ap: argparse.ArgumentParser, *, shared: bool = True) -> None:
    """This benchmark's options (``shared=False``: without ``--agent``/``--precision``, which a caller has)."""
    if shared:
        ap.add_argument("--agent", choices=["pal", "cot", "react"], default="pal")
    ap.add_argument("--task", choices=["gsm8k", "claims"], default="gsm8k")
    ap.add_argument("--n", type=int, default=64, help="questions for the runtime")
    ap.add_argument("--baseline-n", type=int, default=8, help="questions for the one-at-a-time baseline")
    ap.add_argument("--batch-size", type=int, default=32)
    if shared:
        ap.add_argument("--precision", default="fp32", help="decode precision of both sides")
    ap.add_argument("--baseline-precision", default=None,
                    help="decode precision of the one-at-a-time baseline (default: the same as the runtime's); "
                         "e.g. fp32 against --precision auto compares the old default runner with the new one")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: ragloop's)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--shots", type=int, default=None)
    ap.add_argument("--index", default=None, help="claims: an existing SciFact index")
    ap.add_argument("--distractors", type=int, default=300)
    ap.add_argument("--constrained", action="store_true", help="grammar-constrained decoding on both sides")


def measure(args: argparse.Namespace) -> dict:
    """The runtime's questions/s against one question at a time; the figures as a dict."""
    import torch

    from ragloop.agents.factory import AgentSpec, build_agent
    from ragloop.agents.runtime import run_questions
    from ragloop.agents.sandbox import Sandbox
    from ragloop.eval.runners import is_correct, load_claims, load_gsm8k, trace_format_valid
    from ragloop.models.loading import load_policy

    try:
        from ragloop.models.cpu import configure_threads

        threads = configure_threads(args.threads)
    except ImportError:  # older trees
        threads = args.threads or torch.get_num_threads()
        torch.set_num_threads(threads)
    if args.task == "gsm8k":
        examples = load_gsm8k(DATA / "gsm8k" / "test_dev300.jsonl", limit=args.n)
        family = "math"
    else:
        examples = load_claims(DATA / "scifact" / "claims_train.csv", limit=args.n)
        family = "claims"
    policy = load_policy(precision=args.precision)
    base_precision = getattr(args, "baseline_precision", None) or args.precision
    # a baseline in another precision decodes on its own policy object (same weights, its own fast stepper)
    base_policy = policy if base_precision == args.precision else load_policy(precision=base_precision)
    retriever = None
    tmp = None
    if args.task == "claims":
        from ragloop.retrieval import Retriever

        if args.index is None:
            tmp = tempfile.TemporaryDirectory()
            args.index = build_claims_index(examples, args.distractors, Path(tmp.name) / "idx")
        retriever = Retriever.open(args.index)
    tools = ("calculator",) if (args.agent == "react" and args.task == "gsm8k") else ()
    extra = {"constrained": True} if args.constrained else {}
    spec = AgentSpec(kind=args.agent, task=family, shots=args.shots, max_new_tokens=args.max_new_tokens,  # type: ignore[arg-type]
                     tools=tools, seed=0, **extra)
    sandbox = Sandbox()

    def make(pol=policy):
        return build_agent(pol, spec, retriever=retriever, sandbox=sandbox)

    questions = [e.question for e in examples]
    task = "gsm8k" if args.task == "gsm8k" else "claims"

    def timed(fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - w0, time.process_time() - c0

    make(base_policy).run(questions[0])  # warm-up: builds the fast stepper, loads exemplars
    if base_policy is not policy:
        make().run(questions[0])
    k = min(args.baseline_n, len(questions))
    base, base_wall, base_cpu = timed(lambda: [make(base_policy).run(q) for q in questions[:k]])
    batched, wall, cpu = timed(lambda: run_questions(make, questions, policy, batch_size=args.batch_size))

    def sig(t):
        return ([s.raw_output for s in t.steps], t.answer)

    same = sum(sig(a) == sig(b) for a, b in zip(base, batched[:k], strict=True))
    acc = sum(is_correct(task, t.answer, e.gold) for t, e in zip(batched, examples, strict=True)) / len(batched)
    fv = sum(trace_format_valid(t, strict=True) for t in batched) / len(batched)
    base_q_s, run_q_s = k / base_wall, len(batched) / wall
    result = {
        "bench": "runtime_throughput", "agent": args.agent, "task": args.task, "n": len(batched), "baseline_n": k,
        "batch_size": args.batch_size, "precision": policy.precision, "baseline_precision": base_policy.precision,
        "threads": threads,
        "baseline_s_per_q": round(base_wall / k, 3), "runtime_s_per_q": round(wall / len(batched), 3),
        "baseline_cpu_s_per_q": round(base_cpu / k, 3), "runtime_cpu_s_per_q": round(cpu / len(batched), 3),
        "throughput_ratio": round(run_q_s / base_q_s, 2),
        "cpu_ratio": round((base_cpu / k) / max(1e-9, cpu / len(batched)), 2),
        "identical": round(same / k, 3), "accuracy": round(acc, 4), "format_valid_strict": round(fv, 4),
        "tokens_out_per_q": round(sum(t.tokens_out for t in batched) / len(batched), 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if tmp is not None:
        tmp.cleanup()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    print(json.dumps(measure(ap.parse_args())))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
