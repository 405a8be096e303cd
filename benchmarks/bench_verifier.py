"""Does a verifier pick better answers than the majority? GSM8K-PAL: greedy vs majority@N vs verifier@N vs
majority+verifier@N (issue 11 §3).

One run of the policy greedily (the baseline, measured in the same run) and one run of N samples per question
(temperature T, seeds SEED..SEED+N-1, all questions × samples decoded as one batch on the runtime); the three
selection methods of ``ragloop.eval.select`` are then applied to the *same* samples — majority
(self-consistency, Wang et al. 2023), verifier argmax (Cobbe et al. 2021) and the verifier-weighted vote
(DIVERSE, Li et al. 2023) — so their differences come from selection alone. Each accuracy has its Wilson 95% CI
(``ragloop.eval.stats``); pass@N (a question with at least one correct sample) bounds what any selector can
reach. Cost: wall and CPU seconds of both runs, and their ratio (the sampled run against the greedy baseline).

The measurement the issue asks for (an SFT policy and a verifier from an improve run; test_dev300, disjoint from
the questions the verifier was trained on):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_verifier.py --policy runs/improve-1/sft \\
        --verifier runs/improve-1/rm --start 0 --n 300 --samples 8

A verifier of one's own: ``ragloop eval gsm8k --samples 8 --offset A --limit B --out s.jsonl`` on questions
outside the measured slice (or on train.jsonl via --data), then ``ragloop train verifier --traces
s.samples.jsonl --out ckpt/verifier``. Without ``--verifier`` only greedy and majority@N are measured.

Prints one JSON line last (per-method lines go to stderr as they finish).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="default", help="policy spec (default: the embedded SmolLM2; or an SFT run)")
    ap.add_argument("--verifier", default=None, help="reward-model directory (train verifier / train reward --out)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "test_dev300.jsonl"))
    ap.add_argument("--start", type=int, default=0, help="first row of the slice")
    ap.add_argument("--n", type=int, default=300, help="rows in the slice")
    ap.add_argument("--samples", type=int, default=8, help="N: sampled runs per question")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the N runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", type=int, default=None, help="PAL exemplars (default: the agent's 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per program (default: the agent's)")
    ap.add_argument("--precision", default="auto", help="decode weights: auto, fp32, bf16, int8, int4")
    ap.add_argument("--batch-size", type=int, default=None, help="episodes in flight (default: the runtime's)")
    ap.add_argument("--constrained", choices=("auto", "on", "off"), default="auto",
                    help="grammar-constrained PAL programs (auto: on for the embedded model, as eval does)")
    ap.add_argument("--out", default=None, help="directory for the traces (default: a temporary one)")
    args = ap.parse_args()
    if args.samples < 2:
        ap.error("--samples must be >= 2")

    import tempfile

    import torch

    from ragloop.eval.runners import RunConfig, run_benchmark
    from ragloop.eval.stats import wilson_ci
    from ragloop.models import load_policy

    verifier = None
    if args.verifier:
        from ragloop.alignment.data import trace_prompt_text, trace_response_text
        from ragloop.alignment.reward import load_reward_model
        from ragloop.eval.select import RewardModelVerifier

        verifier = RewardModelVerifier(load_reward_model(args.verifier), trace_prompt_text, trace_response_text,
                                       name=args.verifier)
    policy = load_policy(None if args.policy == "default" else args.policy, precision=args.precision)
    constrained = args.constrained == "on" or (args.constrained == "auto" and args.policy == "default")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench_verifier-"))
    common = dict(task="gsm8k", agent="pal", data=args.data, limit=args.n, offset=args.start, seed=args.seed,
                  shots=args.shots, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  constrained=constrained)

    def timed(cfg: RunConfig) -> tuple[object, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        rep = run_benchmark(cfg, policy, verifier=verifier)
        return rep, time.perf_counter() - t0, time.process_time() - c0

    greedy, g_wall, g_cpu = timed(RunConfig(**common, out=str(out_dir / "greedy.jsonl")))  # type: ignore[arg-type]
    print(json.dumps({"greedy": greedy.accuracy, "wall_s": round(g_wall, 1)}), file=sys.stderr)  # type: ignore[attr-defined]
    sampled, s_wall, s_cpu = timed(RunConfig(**common, out=str(out_dir / "sampled.jsonl"), samples=args.samples,  # type: ignore[arg-type]
                                             select="majority+verifier" if verifier else "majority",
                                             temperature=args.temperature))
    sel = sampled.selection  # type: ignore[attr-defined]
    n = greedy.n  # type: ignore[attr-defined]
    rows = {"greedy": {"correct": greedy.correct, "n": n, "accuracy": round(greedy.accuracy, 4),  # type: ignore[attr-defined]
                       "ci95": [round(x, 4) for x in wilson_ci(greedy.correct, n)]}}  # type: ignore[attr-defined]
    for method in ("majority", "verifier", "majority+verifier"):
        rows[f"{method}@{args.samples}"] = sel["by_method"].get(method)
    pass_k = round(sel["pass_at_n"] * n)
    rows[f"pass@{args.samples}"] = {"correct": pass_k, "n": n, "accuracy": sel["pass_at_n"],
                                    "ci95": [round(x, 4) for x in wilson_ci(pass_k, n)]}
    for name, r in rows.items():
        print(json.dumps({name: r}), file=sys.stderr)
    g_acc = rows["greedy"]["accuracy"]
    print(json.dumps({
        "bench": "verifier", "task": "gsm8k-pal", "policy": args.policy, "verifier": args.verifier,
        "slice": greedy.slice, "n": n, "samples": args.samples, "temperature": args.temperature,  # type: ignore[attr-defined]
        "precision": getattr(policy, "precision", None), "constrained": constrained, "seed": args.seed,
        "results": rows, "sample_accuracy": sel["sample_accuracy"],
        "points_over_greedy": {k: round(100 * (v["accuracy"] - g_acc), 1) for k, v in rows.items()
                               if v is not None and k != "greedy"},
        "greedy_wall_s": round(g_wall, 1), "greedy_cpu_s": round(g_cpu, 1),
        "sampled_wall_s": round(s_wall, 1), "sampled_cpu_s": round(s_cpu, 1),
        "sampled_vs_greedy_cpu_ratio": round(s_cpu / g_cpu, 2) if g_cpu > 0 else None,
        "traces": str(out_dir), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "load_avg": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
